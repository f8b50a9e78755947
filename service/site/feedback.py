"""Reader feedback: a radiologist's verdict on each finding of a job, and what it says the truth is."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import FindingFeedback, Job, utcnow
from service.core.status import JobStatus
from service.site.findings import study_call

# How a verdict becomes a reference label, said on the validation page and in the report.
RULE = (
    "Where a study has no imported reference label, the latest reader verdict on the finding stands in: "
    "agree = the model's Present/Absent is confirmed, disagree = it is flipped, missed = Present; "
    "unsure verdicts are left out."
)


class Verdict(StrEnum):
    AGREE = "agree"
    DISAGREE = "disagree"
    UNSURE = "unsure"
    MISSED = "missed"  # present on the image; the model called it absent


class FeedbackError(ValueError):
    """A verdict that cannot be recorded (the job has no analysed result, an unknown finding …)."""


def truth(verdict: str, model_present: bool) -> bool | None:
    """The reference a verdict gives: True/False, or None when it gives none (unsure)."""
    if verdict == Verdict.AGREE:
        return model_present
    if verdict == Verdict.DISAGREE:
        return not model_present
    if verdict == Verdict.MISSED:
        return True
    return None


def record(session: Session, job: Job, finding: str, verdict: Verdict, username: str) -> FindingFeedback:
    """This reader's verdict on one finding of the job, replacing their earlier one (caller commits).

    The model's call is the job's own (any image Present at the operating points it ran with)."""
    call = study_call(job.result) if job.status == JobStatus.DONE else None
    if call is None:
        raise FeedbackError("the job has no analysed result to judge")
    if finding not in call.scores:
        raise FeedbackError("the model does not report this finding")
    model_present = finding in call.present
    if verdict == Verdict.MISSED and model_present:
        raise FeedbackError("the model already called this finding present: agree or disagree instead")
    row = session.scalar(
        select(FindingFeedback).where(
            FindingFeedback.job_id == job.id,
            FindingFeedback.finding == finding,
            FindingFeedback.username == username,
        )
    )
    now = utcnow()
    if row is None:
        row = FindingFeedback(
            job_id=job.id, study_id=job.study_id, finding=finding, username=username, created_at=now
        )
        session.add(row)
    row.verdict = verdict
    row.model_present = model_present
    row.updated_at = now
    session.flush()
    return row


@dataclass(frozen=True)
class FeedbackOut:
    finding: str
    verdict: str
    model_present: bool
    username: str
    updated_at: datetime


def job_feedback(session: Session, job_id: str) -> list[FeedbackOut]:
    """Every reader's verdicts on the job, newest first."""
    rows = session.scalars(
        select(FindingFeedback)
        .where(FindingFeedback.job_id == job_id)
        .order_by(FindingFeedback.updated_at.desc(), FindingFeedback.id.desc())
    ).all()
    return [FeedbackOut(r.finding, r.verdict, r.model_present, r.username, r.updated_at) for r in rows]
