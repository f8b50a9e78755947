"""The fast path's bad inputs, through ``cxr-gateway serve`` on its embedded defaults with real peers.

- A destination that never answers (a TCP port that accepts and says nothing: a hung PACS) holds up
  neither another destination's deliveries nor the next study: each destination has its own lane.
- A study that keeps receiving instances after its job started runs again once at the end, over all
  its instances, never beside the running job.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom.uid import generate_uid
from sqlalchemy import select

from service.core.db import make_session_factory
from service.core.models import Delivery, Instance, Job
from service.core.settings import load_settings
from service.core.status import DeliveryStatus, JobStatus
from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses
from tests.support.orthanc import OrthancServer
from tests.support.peers import require_peer
from tests.support.studies import with_fresh_uids
from tests.support.waiting import wait_until

SOURCE = "dicom/chest/cr-pa-mono1-explicit-le.dcm"


@pytest.fixture
def hung_pacs() -> Iterator[int]:
    """A port that completes the TCP handshake and never answers the A-ASSOCIATE-RQ."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    try:
        yield int(sock.getsockname()[1])
    finally:
        sock.close()


def _send(gw: GatewayProcesses, files: list[Path]) -> None:
    done = storescu("127.0.0.1", gw.listener_port, files, called_aet=gw.ae_title, verbose=False)
    assert done.returncode == 0, done.stderr


def _series_count(pacs: OrthancServer, study_uid: str) -> int:
    found: list[dict[str, Any]] = pacs.rest_post(
        "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}
    )
    return len(found)


def test_a_hung_destination_delays_no_other_destination(
    tmp_path: Path, shared_dir: Path, hung_pacs: int
) -> None:
    require_peer("orthanc", "dcmtk")
    with OrthancServer(workdir=tmp_path / "orthanc") as pacs:
        destinations = [
            {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port},
            {"ae_title": "HUNG", "host": "127.0.0.1", "port": hung_pacs},
        ]
        with GatewayProcesses(tmp_path / "gw", destinations=destinations) as gw:
            sessions = make_session_factory(load_settings(data_dir=gw.data_dir))
            for n in range(2):
                uid = generate_uid()
                _send(gw, [with_fresh_uids(shared_dir / SOURCE, tmp_path / f"{n}.dcm", study_uid=uid)])
                released = time.monotonic()
                # The hung peer's attempts each wait out the 30 s association timeout; the PACS's
                # results must not wait behind them, for this study or the next.
                wait_until(
                    lambda uid=uid: _series_count(pacs, uid) >= 3,  # type: ignore[misc]
                    25,
                    f"study {n}'s results in the PACS",
                    interval=0.05,
                    detail=gw.log_tail,
                )
                assert time.monotonic() - released < 20
            with sessions() as s:
                hung = s.scalars(select(Delivery.status).where(Delivery.ae_title == "HUNG")).all()
            assert len(hung) == 6 and DeliveryStatus.DELIVERED not in hung


def test_instances_after_the_job_started_run_the_study_once_more_after_it(
    tmp_path: Path, shared_dir: Path
) -> None:
    require_peer("dcmtk")
    uid = generate_uid()
    first = [with_fresh_uids(shared_dir / SOURCE, tmp_path / f"a{i}.dcm", study_uid=uid) for i in range(3)]
    late = [with_fresh_uids(shared_dir / SOURCE, tmp_path / f"b{i}.dcm", study_uid=uid) for i in range(2)]
    # Two pool processes: two jobs of the study could run side by side if the assembler let them.
    env = {"CXR_WORKER_CONCURRENCY": "2"}
    with GatewayProcesses(tmp_path / "gw", env=env) as gw:
        sessions = make_session_factory(load_settings(data_dir=gw.data_dir))

        def jobs() -> list[Job]:
            with sessions() as s:
                return list(s.scalars(select(Job).order_by(Job.created_at)).all())

        _send(gw, first)
        wait_until(
            lambda: any(j.status == JobStatus.RUNNING for j in jobs()),
            120,
            "the first job running",
            interval=0.02,
            detail=gw.log_tail,
        )
        # One instance per association, as some modalities send: each release asks for a run.
        for path in late:
            _send(gw, [path])

        def both_done() -> list[Job] | None:
            js = jobs()
            return js if len(js) == 2 and all(j.status == JobStatus.DONE for j in js) else None

        settled = wait_until(
            both_done,
            120,
            "both jobs done",
            interval=0.1,
            detail=gw.log_tail,
        )
        assert settled is not None
        with sessions() as s:
            late_received = s.scalars(
                select(Instance.received_at).where(Instance.sop_instance_uid.in_(_sop_uids(late)))
            ).all()
    one, two = settled
    assert min(late_received) < one.finished_at, "the late instances came after the first job: no overlap"
    assert two.started_at is not None and one.finished_at is not None
    assert two.started_at >= one.finished_at, "the study ran twice at the same time"
    assert len(one.result["images"]) == 3 and len(two.result["images"]) == 5  # type: ignore[index]
    assert len(jobs()) == 2


def _sop_uids(paths: list[Path]) -> list[str]:
    from pydicom import dcmread

    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths]
