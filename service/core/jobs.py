"""The job state machine, shared by every process: a job's creation and each transition (with its
timestamp and an event row). The hand-over of a queued job to the workers is ``queue.send_queued``."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime

from sqlalchemy import ColumnElement
from sqlalchemy.orm import Session

from service.core.models import Job, JobEvent
from service.core.outbox import compare_and_set
from service.core.status import JobStatus

_TIMESTAMP_COLUMN = {
    JobStatus.QUEUED: "queued_at",
    JobStatus.RUNNING: "started_at",
    JobStatus.DONE: "finished_at",
    JobStatus.FAILED: "finished_at",
    JobStatus.SKIPPED: "finished_at",
}


def create(session: Session, study_id: int, calling_ae_title: str | None, now: datetime) -> Job:
    """A new job for the study, 'received', with its first event (flushed: its id is set)."""
    job = Job(
        study_id=study_id,
        status=JobStatus.RECEIVED,
        calling_ae_title=calling_ae_title,
        received_at=now,
        created_at=now,
    )
    session.add(job)
    session.flush()
    session.add(JobEvent(job_id=job.id, status=JobStatus.RECEIVED, at=now))
    return job


def transition(
    session: Session,
    job_id: str,
    to: JobStatus,
    *,
    expected: Iterable[JobStatus] | None = None,
    reason_code: str | None = None,
    reason_detail: str | None = None,
    now: datetime | None = None,
    only_if: ColumnElement[bool] | None = None,
) -> bool:
    """Move a job to ``to`` if it is in one of ``expected`` (any state when None) and matches ``only_if``;
    True if it moved."""
    now = now or datetime.now(UTC)
    values: dict[str, object] = {"status": to, "reason_code": reason_code, "reason_detail": reason_detail}
    column = _TIMESTAMP_COLUMN.get(to)
    if column:
        values[column] = now
    # Jobs have no allowed-moves table: any state may be asked for (retries, requeues, replays).
    moved = compare_and_set(session, Job, job_id, expected, only_if, values)
    if moved:
        session.add(JobEvent(job_id=job_id, status=to, reason_code=reason_code, at=now))
    return moved


def record_event(session: Session, job_id: str, status: JobStatus, reason_code: str) -> None:
    """An event without a move: something that went wrong in a stage without failing the job."""
    session.add(JobEvent(job_id=job_id, status=status, reason_code=reason_code, at=datetime.now(UTC)))
