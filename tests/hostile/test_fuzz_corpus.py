"""The fuzzing corpus against a real `cxr-gateway serve`: hundreds of seeded hostile cases.

For every case the listener answers a defined status (C-STORE: 0x0000, 0xA700, 0xA900 or 0xC210; a PDU
case: an answer from the protocol's vocabulary and the connection closed within a deadline), every
accepted instance's job ends in a final state within a bound, no process of the gateway passes its
memory bound, no association thread or staging file is left behind, and a normal study afterwards
still gets its SR and SC.

The default run is under two hundred cases (CXR_HOSTILE_CASES, default 120 data sets and 60 PDU
exchanges, to keep the default test run within its 15 minutes; CXR_HOSTILE_SEED, default 14, picks another
corpus). A longer run: ``CXR_HOSTILE_CASES=2000 pytest tests/hostile/test_fuzz_corpus.py``.
"""

from __future__ import annotations

import collections
import contextlib
import os
import socket
import time
from pathlib import Path

from sqlalchemy import select

from service.core.db import make_session_factory
from service.core.models import Instance, Job
from service.core.settings import load_settings
from service.core.status import JobStatus
from tests.support import pdu as P
from tests.support.dcmtk import storescu
from tests.support.fuzz import DatasetCase, dataset_cases, pdu_cases
from tests.support.gateway import GatewayProcesses
from tests.support.studies import with_fresh_uids

SEED = int(os.environ.get("CXR_HOSTILE_SEED", "14"))
DATASET_CASES = int(os.environ.get("CXR_HOSTILE_CASES", "120"))
PDU_CASES = max(1, DATASET_CASES // 2)
DEFINED_STATUSES = {0x0000, 0xA700, 0xA900, 0xC210}
ANSWERS = {P.A_ASSOCIATE_AC, P.A_ASSOCIATE_RJ, P.P_DATA_TF, P.A_RELEASE_RP, P.A_ABORT}
FINAL = {JobStatus.DONE, JobStatus.FAILED, JobStatus.SKIPPED}
MiB = 1024 * 1024
# Peak resident memory of each gateway process (the decoder children also run under RLIMIT_AS).
MEMORY_BOUND = {"listener": 600 * MiB, "worker": 1500 * MiB, "decoder": 1024 * MiB, "other": 600 * MiB}
JOB_BOUND_SECONDS = 240  # all accepted cases final within this after the last one was sent


def _gateway(workdir: Path, redis_url: str) -> GatewayProcesses:
    env = {
        # Redis: the filesystem broker polls once a second, and the corpus has a few hundred jobs.
        "CXR_BROKER_URL": redis_url,
        "CXR_LISTENER_NETWORK_TIMEOUT": "5",
        "CXR_LISTENER_ACSE_TIMEOUT": "2",
        "CXR_LISTENER_DIMSE_TIMEOUT": "10",
        "CXR_DECODE_TIMEOUT_SECONDS": "10",
        "CXR_DECODE_MEMORY_LIMIT_BYTES": str(1024 * MiB),
        "CXR_SPOOL_MIN_FREE_BYTES": "0",
        "CXR_TORCH_THREADS": "1",
        "CXR_LOG_LEVEL": "WARNING",
    }
    return GatewayProcesses(workdir, env=env)


def test_the_hostile_corpus(tmp_path: Path, shared_dir: Path, redis_url: str) -> None:
    """PDU cases, then data set cases, then a normal study, against one running gateway."""
    with _gateway(tmp_path / "gw", redis_url) as gateway:
        try:
            _pdu_corpus(gateway)
            _dataset_corpus(gateway)
            _normal_study_gets_its_outputs(gateway, tmp_path, shared_dir)
        except BaseException:
            print(gateway.log_tail(150))
            raise


# ---------------------------------------------------------------------------------------------- helpers


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = collections.defaultdict(list)
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children[int(fields[1])].append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def _status(pid: int) -> dict[str, str]:
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in lines if ":" in line)
    fields["cmdline"] = cmdline
    return {k: v.strip() for k, v in fields.items()}


def _role(cmdline: str) -> str:
    if "worker.dicom.decoder" in cmdline:
        return "decoder"
    if "service.cli listener" in cmdline or "cli listener" in cmdline:
        return "listener"
    if "-m worker" in cmdline or "celery" in cmdline:
        return "worker"
    return "other"


def _memory_report(gw: GatewayProcesses) -> dict[str, int]:
    """Peak RSS (VmHWM) per role, bytes, over the gateway's process tree."""
    peaks: dict[str, int] = collections.defaultdict(int)
    for proc in gw.procs.values():
        for pid in _descendants(proc.pid):
            status = _status(pid)
            if "VmHWM" in status:
                role = _role(status["cmdline"])
                peaks[role] = max(peaks[role], int(status["VmHWM"].split()[0]) * 1024)
    return dict(peaks)


def _listener_pid(gw: GatewayProcesses) -> int:
    for proc in gw.procs.values():
        for pid in _descendants(proc.pid):
            if _role(_status(pid).get("cmdline", "")) == "listener":
                return pid
    raise AssertionError("no listener process")


def _staging_files(gw: GatewayProcesses) -> list[Path]:
    return [p for p in (gw.data_dir / "spool" / ".incoming").rglob("*") if p.is_file()]


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout:.0f}s")
        time.sleep(0.25)


def _normal_study_gets_its_outputs(gw: GatewayProcesses, tmp_path: Path, shared_dir: Path) -> None:
    source = with_fresh_uids(shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm", tmp_path / "normal.dcm")
    result = storescu("127.0.0.1", gw.listener_port, [source], called_aet=gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr
    sessions = make_session_factory(load_settings(data_dir=gw.data_dir))

    def done() -> bool:
        with sessions() as s:
            row = s.execute(
                select(Job.id, Job.status)
                .join(Instance, Instance.study_id == Job.study_id)
                .where(Instance.sop_instance_uid == _sop_uid(source))
            ).first()
        return row is not None and row.status == JobStatus.DONE

    _wait(done, 180, "the normal study's job done")
    with sessions() as s:
        job_id = s.scalar(
            select(Job.id)
            .join(Instance, Instance.study_id == Job.study_id)
            .where(Instance.sop_instance_uid == _sop_uid(source))
        )
    outputs = {p.name for p in (gw.data_dir / "outputs" / str(job_id)).glob("*.dcm")}
    assert {"sr-1.dcm", "sc-1.dcm"} <= outputs, outputs
    sessions.kw["bind"].dispose()


def _sop_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


# ---------------------------------------------------------------------------------------------- data sets


class _Sender:
    """Sends data set cases as C-STOREs over raw associations, one context per SOP class and syntax."""

    CHUNK = 256 * 1024

    def __init__(self, port: int, cases: list[DatasetCase]) -> None:
        self.port = port
        pairs = sorted({(c.sop_class, c.syntax) for c in cases})
        self.contexts = {pair: 2 * n + 1 for n, pair in enumerate(pairs)}
        assert len(self.contexts) <= 128
        self.rq = P.associate_rq(
            calling="FUZZER", contexts=[(cid, sop, [ts]) for (sop, ts), cid in self.contexts.items()]
        )
        self.peer: P.RawPeer | None = None

    def _connect(self) -> P.RawPeer:
        if self.peer is None:
            self.peer = P.RawPeer(self.port, timeout=60)
            self.peer.associate(self.rq)
        return self.peer

    def store(self, case: DatasetCase) -> int | str:
        peer = self._connect()
        context = self.contexts[(case.sop_class, case.syntax)]
        command = P.command_set(0x0001, case.sop_class, case.sop_instance, data_set=True)
        ok = peer.send(P.p_data(P.pdv(context, 0x03, command)))
        body = case.body or b"\x00\x00"
        for start in range(0, len(body), self.CHUNK):
            last = start + self.CHUNK >= len(body)
            ok = ok and peer.send(
                P.p_data(P.pdv(context, 0x02 if last else 0x00, body[start : start + self.CHUNK]))
            )
        got = peer.read_pdu(timeout=60) if ok else None
        if got is None or got[0] != P.P_DATA_TF:
            self.close()
            return "aborted" if got is None or got[0] == P.A_ABORT else f"pdu-{got[0]}"
        status = P.c_store_status(got[1])
        return status if status is not None else "no-status"

    def close(self) -> None:
        if self.peer is not None:
            self.peer.send(P.release_rq())
            self.peer.close()
            self.peer = None


def _dataset_corpus(gateway: GatewayProcesses) -> None:
    started = time.monotonic()
    cases = dataset_cases(SEED, DATASET_CASES)
    generated = time.monotonic()
    sender = _Sender(gateway.listener_port, cases)
    outcomes: dict[str, list[str]] = collections.defaultdict(list)
    accepted: list[str] = []
    try:
        for case in cases:
            status = sender.store(case)
            outcomes[str(status)].append(case.name)
            if status == 0x0000:
                accepted.append(case.sop_instance)
    finally:
        sender.close()
    sent = time.monotonic()
    undefined = {k: v for k, v in outcomes.items() if not (k.isdigit() and int(k) in DEFINED_STATUSES)}
    assert undefined == {}, f"statuses outside {sorted(DEFINED_STATUSES)}: {undefined}\n{gateway.log_tail()}"
    assert accepted, "the corpus must reach the worker too"

    sessions = make_session_factory(load_settings(data_dir=gateway.data_dir))

    def final_jobs() -> dict[str, str]:
        with sessions() as s:
            rows = s.execute(
                select(Instance.sop_instance_uid, Job.status)
                .join(Job, Job.study_id == Instance.study_id)
                .where(Instance.sop_instance_uid.in_(accepted))
            ).all()
        return {uid: status for uid, status in rows}

    def all_final() -> bool:
        jobs = final_jobs()
        return len(jobs) == len(accepted) and all(JobStatus(s) in FINAL for s in jobs.values())

    try:
        _wait(all_final, JOB_BOUND_SECONDS, f"{len(accepted)} accepted cases' jobs final")
    finally:
        sessions.kw["bind"].dispose()
    finished = time.monotonic()
    peaks = _memory_report(gateway)
    over = {role: peak for role, peak in peaks.items() if peak > MEMORY_BOUND[role]}
    assert over == {}, f"peak RSS over the bounds {MEMORY_BOUND}: {over}"
    assert _staging_files(gateway) == []
    counts = {k: len(v) for k, v in outcomes.items()}
    print(
        f"data set corpus seed={SEED} cases={len(cases)} statuses={counts} peaks={peaks} "
        f"generated={generated - started:.1f}s sent={sent - generated:.1f}s jobs={finished - sent:.1f}s"
    )


# ---------------------------------------------------------------------------------------------- PDUs


def _pdu_corpus(gateway: GatewayProcesses) -> None:
    listener = _listener_pid(gateway)
    baseline = int(_status(listener)["Threads"])
    answers: collections.Counter[int] = collections.Counter()
    for case in pdu_cases(SEED, PDU_CASES):
        with P.RawPeer(gateway.listener_port) as peer:
            # As a real peer: nothing more before the answer to the A-ASSOCIATE-RQ.
            first, *rest = case.steps
            types = []
            if peer.send(first) and (answer := peer.read_pdu(timeout=20)) is not None:
                types.append(answer[0])
            for step in rest:
                if not peer.send(step):
                    break
            with contextlib.suppress(OSError):
                peer.sock.shutdown(socket.SHUT_WR)
            try:
                types += peer.read_all(timeout=20)
            except TimeoutError:
                raise AssertionError(f"case {case.name}: the listener left the connection open") from None
        assert set(types) <= ANSWERS, f"case {case.name}: {types}"
        answers.update(types)
    _wait(lambda: int(_status(listener)["Threads"]) <= baseline, 30, "association threads gone")
    _wait(lambda: _staging_files(gateway) == [], 30, "staging files gone")
    peaks = _memory_report(gateway)
    assert peaks.get("listener", 0) <= MEMORY_BOUND["listener"], peaks
    print(f"PDU corpus seed={SEED} cases={PDU_CASES} answers={dict(answers)}")
