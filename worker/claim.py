"""A run's hold on its study job: claimed (running), then settled as failed or finished, never over an
outcome another run of the same job has already recorded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.errors import PermanentError
from service.core.jobs import record_event, transition
from service.core.models import Delivery, Instance, Job
from service.core.status import DeliveryStatus, JobStatus, ReasonCode

# The states a run may finish a job from: a job that is already done, failed, skipped or cancelled keeps
# that outcome (another run of it got there first, or an admin cancelled it).
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


@dataclass(frozen=True)
class Claimed:
    """A job this run analyses: its study and each received instance's SOP Instance UID and spool file."""

    study_uid: str
    rows: list[tuple[str, Path]]


@dataclass(frozen=True)
class AlreadyFinished:
    """A job finished by an earlier run: its outcome, and its deliveries still to be sent."""

    status: str
    pending: list[int]


def claim_job(
    sessions: sessionmaker[Session], spool_dir: Path, job_id: str, worker: str | None
) -> Claimed | AlreadyFinished:
    """Mark the job running under ``worker`` (whose heartbeat tells the reconciler if it dies mid-job)."""
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise PermanentError(ReasonCode.INTERNAL_ERROR, "unknown job")
        if JobStatus(job.status).is_final:
            # A redelivered task (worker died, or the broker was away when deliveries were sent):
            # hand back what is still undelivered instead of analysing again.
            pending = session.scalars(
                select(Delivery.id).where(
                    Delivery.job_id == job_id, Delivery.status == DeliveryStatus.PENDING
                )
            ).all()
            return AlreadyFinished(job.status, list(pending))
        transition(session, job_id, JobStatus.RUNNING, reason_code=None)
        job.attempts += 1
        job.worker = worker
        instances = session.scalars(
            select(Instance).where(Instance.study_id == job.study_id).order_by(Instance.id)
        ).all()
        rows = [(i.sop_instance_uid, spool_dir / i.spool_path) for i in instances]
        return Claimed(job.study.study_instance_uid, rows)


def fail_job(sessions: sessionmaker[Session], job_id: str, reason: str, detail: str) -> None:
    with sessions.begin() as session:
        transition(
            session,
            job_id,
            JobStatus.FAILED,
            expected=UNFINISHED,
            reason_code=reason,
            reason_detail=detail,
        )


def finish_job(
    session: Session, job_id: str, skipped_reason: str | None, notes: list[dict[str, object]]
) -> JobStatus:
    """Done (or skipped with ``skipped_reason``), with an event for each reason among ``notes``: what went
    wrong without costing the job. Returns the status the job was finished as."""
    final = JobStatus.SKIPPED if skipped_reason else JobStatus.DONE
    if transition(session, job_id, final, expected=UNFINISHED, reason_code=skipped_reason):
        for reason in sorted({str(note["reason"]) for note in notes}):
            record_event(session, job_id, final, reason)
    return final
