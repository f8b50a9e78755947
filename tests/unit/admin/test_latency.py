"""Latency percentiles of the last hour, from the job and delivery rows (page and API)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.admin.latency import percentile
from service.core.models import Delivery, Instance, Job, Study
from service.core.status import DeliveryStatus, JobStatus


def _study(
    sessions: sessionmaker[Session],
    n: int,
    released: datetime,
    delivered: list[float | None],
    late: datetime | None = None,
) -> None:
    """A study released at ``released``, queued 0.2 s later, run 0.05 s after that for 0.6 s; each
    delivery delivered that many seconds after release (None: still retrying)."""
    s = lambda seconds: released + timedelta(seconds=seconds)  # noqa: E731
    with sessions.begin() as session:
        study = Study(study_instance_uid=f"1.2.{n}", last_received_at=late or released)
        session.add(study)
        session.flush()
        session.add(
            Instance(
                study_id=study.id,
                sop_instance_uid=f"1.2.{n}.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                spool_path="x",
                size_bytes=1,
                sha256="0" * 64,
                calling_ae_title="MOD",
                received_at=s(-0.01),
            )
        )
        job = Job(
            study_id=study.id,
            status=JobStatus.DONE,
            received_at=s(-0.01),
            queued_at=s(0.2),
            started_at=s(0.25),
            finished_at=s(0.85),
        )
        session.add(job)
        session.flush()
        for i, at in enumerate(delivered):
            session.add(
                Delivery(
                    job_id=job.id,
                    ae_title="PACS",
                    host="127.0.0.1",
                    port=104,
                    sop_instance_uid=f"1.2.{n}.9.{i}",
                    kind="sr",
                    output_path="x",
                    status=DeliveryStatus.DELIVERED if at is not None else DeliveryStatus.RETRYING,
                    delivered_at=None if at is None else s(at),
                )
            )


def test_stages_of_the_last_hour(sessions: sessionmaker[Session], viewer: TestClient) -> None:
    now = datetime.now(UTC)
    _study(sessions, 1, now - timedelta(minutes=5), [1.0, 1.3])
    # A late instance moved the study's time on after this job was queued: its release is its instance.
    _study(sessions, 2, now - timedelta(minutes=4), [1.1], late=now - timedelta(minutes=1))
    _study(sessions, 3, now - timedelta(minutes=3), [0.9, None])  # not every output delivered yet
    _study(sessions, 4, now - timedelta(hours=2), [5.0])  # outside the hour

    body = viewer.get("/api/latency").json()
    stages = {s["stage"]: s for s in body["stages"]}
    assert body["window_seconds"] == 3600
    assert stages["quiet"]["count"] == 3
    assert abs(stages["quiet"]["p50"] - 0.2) < 0.02  # study 2 measured from its instance (0.21)
    assert stages["analysis"]["p95"] == 0.6
    assert stages["delivery"]["count"] == 2 and stages["end_to_end"]["count"] == 2
    assert sorted([stages["end_to_end"]["p50"], stages["end_to_end"]["p99"]]) == [1.205, 1.298]

    page = viewer.get("/latency")
    assert page.status_code == 200 and "end_to_end" in page.text and "1.21" in page.text


def test_percentile_interpolates_between_ranks() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert abs((percentile(list(map(float, range(1, 21))), 95) or 0) - 19.05) < 1e-9
