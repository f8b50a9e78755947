"""Rows the database tests start from: a study, and a study with one job."""

from __future__ import annotations

from sqlalchemy.orm import Session

from service.core.models import Job, Study


def add_study(session: Session, uid: str = "1.2.3") -> int:
    """A study row (flushed); its id."""
    study = Study(study_instance_uid=uid)
    session.add(study)
    session.flush()
    return study.id


def add_job(session: Session, uid: str = "1.2.3", **columns: object) -> Job:
    """A job (with ``columns``: id, status, times…) of a new study ``uid`` (flushed)."""
    job = Job(study_id=add_study(session, uid), **columns)
    session.add(job)
    session.flush()
    return job
