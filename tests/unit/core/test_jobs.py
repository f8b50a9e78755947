"""The job state machine's creation and hand-over on real SQLite and the filesystem broker."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core import jobs, queue
from service.core.db import make_session_factory, migrate
from service.core.models import Job, JobEvent
from service.core.queue import make_celery
from service.core.reconciler import reconcile
from service.core.settings import Settings, load_settings
from service.core.status import JobStatus
from tests.support.rows import add_study

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def _refuse(*args: object, **kwargs: object) -> None:
    raise ConnectionError("broker down")


Parts = tuple[Settings, sessionmaker[Session], Celery, int]


@pytest.fixture
def parts(tmp_path: Path) -> Parts:
    """A migrated SQLite database with one study, and the embedded filesystem broker."""
    settings = load_settings(data_dir=tmp_path)
    migrate(settings)
    sessions = make_session_factory(settings)
    with sessions.begin() as s:
        study_id = add_study(s)
    return settings, sessions, make_celery(settings), study_id


def test_a_job_is_created_received_with_its_first_event_and_sent_once_queued(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings, sessions, celery, study_id = parts
    with sessions.begin() as s:
        job_id = jobs.create(s, study_id, "MODALITY", NOW).id
        assert jobs.transition(s, job_id, JobStatus.QUEUED, expected=[JobStatus.RECEIVED], now=NOW)
    assert queue.send_queued(sessions, celery, job_id) is None
    assert len(list((settings.broker_dir / "messages").glob("*.msg"))) == 1
    with sessions() as s:
        assert s.scalars(select(JobEvent.status).order_by(JobEvent.id)).all() == ["received", "queued"]
        job = s.get(Job, job_id)
        assert job is not None and (job.status, job.calling_ae_title) == (JobStatus.QUEUED, "MODALITY")

    monkeypatch.setattr("service.core.queue.enqueue", _refuse)
    refused = queue.send_queued(sessions, celery, job_id)
    assert isinstance(refused, ConnectionError)
    with sessions() as s:
        assert s.scalar(select(Job.status)) == JobStatus.RECEIVED  # the assembler queues it again


def test_the_reconciler_hands_a_job_back_to_received_when_the_broker_refuses(
    parts: Parts, monkeypatch: pytest.MonkeyPatch
) -> None:
    _settings, sessions, celery, study_id = parts
    with sessions.begin() as s:
        queued_at = NOW - timedelta(hours=1)
        s.add(Job(id="1" * 32, study_id=study_id, status=JobStatus.QUEUED, queued_at=queued_at))
    monkeypatch.setattr("service.core.queue.enqueue", _refuse)
    kwargs = {"queued_deadline": timedelta(minutes=15), "running_deadline": timedelta(minutes=30)}
    assert reconcile(sessions, celery, now=NOW, **kwargs) == []
    with sessions() as s:
        assert s.scalar(select(Job.status)) == JobStatus.RECEIVED
