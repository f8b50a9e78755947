"""Graceful shutdown on SIGTERM (what Kubernetes, systemd and `serve` send), with real processes.

- The listener stops accepting associations and lets open ones finish.
- A worker finishes its running study, or, past its shutdown time, hands the task back to the broker
  so another worker runs it (not the reconciler: its deadline is far away here).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import func, select

from service.core.db import make_session_factory
from service.core.models import Instance, Job, Worker
from service.core.settings import load_settings
from service.core.status import JobStatus
from tests.support.dcmtk import echoscu, storescu, storescu_process
from tests.support.gateway import GatewayProcesses
from tests.support.net import port_open
from tests.support.studies import with_fresh_uids


def _one_study(source: Path, folder: Path, n: int) -> list[Path]:
    study_uid = generate_uid()
    return [with_fresh_uids(source, folder / f"{i}.dcm", study_uid=study_uid) for i in range(n)]


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise TimeoutError(what)


def test_listener_finishes_open_associations_and_refuses_new_ones(tmp_path: Path, shared_dir: Path) -> None:
    # 40 uncompressed 7 MB instances in one association: long enough to stop the listener mid-way.
    files = _one_study(shared_dir / "dicom/chest/cr-pa-mono1-explicit-le.dcm", tmp_path / "in", 40)
    gw = GatewayProcesses(
        tmp_path / "gw", commands=("listener",), env={"CXR_LISTENER_DRAIN_SECONDS": "120"}
    ).start()
    sessions = make_session_factory(load_settings(data_dir=gw.data_dir))
    probe = socket.socket()
    try:
        sender = storescu_process(
            "127.0.0.1", gw.listener_port, files, called_aet=gw.ae_title, profile_dir=tmp_path / "scu"
        )

        def stored() -> int:
            with sessions() as s:
                return int(s.scalar(select(func.count()).select_from(Instance)) or 0)

        _wait(lambda: stored() > 0, 60, "no instance arrived")
        # A load balancer's TCP probe that never negotiates must not hold the drain (30 s ACSE timeout).
        probe.connect(("127.0.0.1", gw.listener_port))
        os.kill(gw.procs["listener"].pid, signal.SIGTERM)
        _wait(lambda: not port_open("127.0.0.1", gw.listener_port), 10, "the port stayed open")
        refused = echoscu("127.0.0.1", gw.listener_port, called_aet=gw.ae_title)
        _out, err = sender.communicate(timeout=180)
        sent_at = time.monotonic()
        listener_rc = gw.procs["listener"].wait(timeout=60)
        exited_after = time.monotonic() - sent_at
    finally:
        probe.close()
        gw.stop()
    assert stored() > 0
    assert refused.returncode != 0, "a new association was accepted while draining"
    assert sender.returncode == 0, err
    assert stored() == 40, "every instance of the open association was taken"
    assert listener_rc == 0
    assert exited_after < 10, f"the listener waited {exited_after:.1f} s after the last association"
    log = gw.log_text()
    assert "listener draining open_associations=1 " in log and "aborted" not in log


@pytest.fixture
def long_study_gateway(tmp_path: Path, shared_dir: Path, redis_url: str) -> Iterator[GatewayProcesses]:
    """A listener on Redis (workers start per test), and a 12-image study already received."""
    gw = GatewayProcesses(
        tmp_path / "gw",
        commands=("listener",),
        env={
            "CXR_BROKER_URL": redis_url,
            "CXR_RECONCILE_RUNNING_AFTER_SECONDS": "3600",
            # Heartbeats every second, a worker silent for 3 s is dead: a cold or warm stop must be
            # recorded as a stop, or the reconciler would run the handed-back study a second time.
            "CXR_WORKER_HEARTBEAT_SECONDS": "1",
            "CXR_RECONCILE_WORKER_LOST_AFTER_SECONDS": "3",
            "CXR_RECONCILE_INTERVAL_SECONDS": "1",
        },
    ).start()
    files = _one_study(shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm", tmp_path / "in", 12)
    try:
        storescu("127.0.0.1", gw.listener_port, files, called_aet=gw.ae_title, check=True)
        yield gw
    finally:
        gw.stop()


def _worker(gw: GatewayProcesses, name: str, shutdown_seconds: float) -> subprocess.Popen[bytes]:
    log_path = gw.workdir / f"{name}.log"
    gw.logs[name] = log_path
    env = {**gw.env, "CXR_WORKER_SHUTDOWN_SECONDS": str(shutdown_seconds)}
    with log_path.open("wb") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "service.cli", "worker"],
            env=env,
            cwd=gw.workdir,
            stdout=fh,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _job(gw: GatewayProcesses) -> tuple[str, int] | None:
    sessions = make_session_factory(load_settings(data_dir=gw.data_dir))
    with sessions() as s:
        job = s.scalars(select(Job)).first()
        return (job.status, job.attempts) if job is not None else None


def _workers(gw: GatewayProcesses) -> dict[str, Worker]:
    sessions = make_session_factory(load_settings(data_dir=gw.data_dir))
    with sessions() as s:
        return {w.name: w for w in s.scalars(select(Worker))}


def _by_pid(gw: GatewayProcesses, pid: int) -> Worker:
    (row,) = [w for w in _workers(gw).values() if w.pid == pid]
    return row


def _job_worker(gw: GatewayProcesses) -> str | None:
    sessions = make_session_factory(load_settings(data_dir=gw.data_dir))
    with sessions() as s:
        return s.scalars(select(Job.worker)).first()


def _stop_worker(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def test_a_worker_finishes_its_running_study_on_sigterm(long_study_gateway: GatewayProcesses) -> None:
    gw = long_study_gateway
    worker = _worker(gw, "worker", shutdown_seconds=300)
    try:
        _wait(lambda: (_job(gw) or ("",))[0] == JobStatus.RUNNING, 120, "the job never started")
        worker.send_signal(signal.SIGTERM)  # the main process only, as Kubernetes does
        rc = worker.wait(timeout=300)
    except BaseException:
        print(gw.log_tail(120))
        raise
    finally:
        _stop_worker(worker)
    assert _job(gw) == (JobStatus.DONE, 1), gw.log_tail(60)
    assert rc == 0
    # It ran under its own node name, and said goodbye on the way out.
    (name, row), *others = _workers(gw).items()
    assert not others and name == _job_worker(gw) and name.startswith(f"cxr-{worker.pid}-")
    assert row.stopped_at is not None and row.pool == "prefork" and row.device == "cpu"


@contextlib.contextmanager
def _busy_and_spare(
    gw: GatewayProcesses, shutdown_seconds: float
) -> Iterator[tuple[subprocess.Popen[bytes], subprocess.Popen[bytes]]]:
    """Two workers up (the spare starts with the busy one, saving a model load); yields (busy, spare)
    once the study runs on one of them, prints the logs if the body fails, and kills both at the end."""
    procs = [_worker(gw, f"worker-{i}", shutdown_seconds=shutdown_seconds) for i in (1, 2)]

    def busy() -> subprocess.Popen[bytes] | None:
        job, name = _job(gw), _job_worker(gw)
        row = _workers(gw).get(name) if job and job[0] == JobStatus.RUNNING and name else None
        return next((p for p in procs if row is not None and p.pid == row.pid), None)

    try:
        _wait(lambda: busy() is not None, 120, "the job never started")
        first = busy()
        assert first is not None
        yield first, next(p for p in procs if p is not first)
    except BaseException:
        print(gw.log_tail(120))
        raise
    finally:
        for proc in procs:
            _stop_worker(proc)


def test_a_worker_past_its_shutdown_time_hands_the_study_back(long_study_gateway: GatewayProcesses) -> None:
    gw = long_study_gateway
    with _busy_and_spare(gw, shutdown_seconds=0) as (first, second):
        t0 = time.monotonic()
        first.send_signal(signal.SIGTERM)
        first.wait(timeout=60)
        stopped_in = time.monotonic() - t0
        assert _job(gw) != (JobStatus.DONE, 1), "the first worker should not have finished it"
        _wait(lambda: (_job(gw) or ("",))[0] == JobStatus.DONE, 180, "the handed-back task never ran")
    assert _job(gw) == (JobStatus.DONE, 2)
    assert stopped_in < 30
    # The cold stop was recorded (so the reconciler left the study to the broker's hand-back).
    assert _by_pid(gw, first.pid).stopped_at is not None
    assert _job_worker(gw) == _by_pid(gw, second.pid).name
    assert "worker_lost" not in gw.log_text()


def test_the_study_of_a_killed_worker_is_requeued_once_its_heartbeat_stops(
    long_study_gateway: GatewayProcesses,
) -> None:
    """kill -9 leaves the task unacknowledged in Redis for its visibility timeout (hours); the heartbeat
    tells the listener's reconciler within seconds, long before its running deadline (1 h here)."""
    gw = long_study_gateway
    with _busy_and_spare(gw, shutdown_seconds=60) as (first, second):
        os.killpg(first.pid, signal.SIGKILL)  # the whole worker, pool children included: a lost machine
        first.wait()
        killed_at = time.monotonic()
        _wait(lambda: (_job(gw) or ("",))[0] == JobStatus.DONE, 180, "the orphaned study never ran again")
        recovered_in = time.monotonic() - killed_at
    assert _job(gw) == (JobStatus.DONE, 2)
    assert _job_worker(gw) == _by_pid(gw, second.pid).name
    assert "reason=worker_lost" in gw.log_text()
    assert _by_pid(gw, first.pid).stopped_at is None
    assert recovered_in < 120, f"took {recovered_in:.0f} s"
