"""The assembler's clock on real SQLite and the filesystem broker: quiet, busy, touch, broker down."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from service.core.db import make_session_factory, migrate
from service.core.models import Job, JobEvent, Study
from service.core.queue import make_celery
from service.core.settings import load_settings
from service.core.status import JobStatus
from service.scp.assembler import StudyAssembler
from service.scp.backpressure import BackPressure

T0 = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def parts(tmp_path: Path) -> tuple[StudyAssembler, BackPressure, set[int], int]:
    settings = load_settings(data_dir=tmp_path, study_quiet_seconds=2.0, spool_min_free_bytes=0)
    migrate(settings)
    sessions = make_session_factory(settings)
    settings.spool_dir.mkdir(parents=True)
    pressure = BackPressure(settings)
    busy: set[int] = set()
    assembler = StudyAssembler(
        settings, sessions, make_celery(settings), pressure=pressure, busy=lambda: busy
    )
    with sessions.begin() as session:
        study = Study(study_instance_uid="1.2.3", last_received_at=T0)
        session.add(study)
        session.flush()
        job = Job(study_id=study.id, status=JobStatus.RECEIVED, received_at=T0, created_at=T0)
        session.add(job)
        session.flush()
        session.add(JobEvent(job_id=job.id, status=JobStatus.RECEIVED, at=T0))
        study_id = study.id
    return assembler, pressure, busy, study_id


def test_quiet_period_counts_from_the_last_instance(
    parts: tuple[StudyAssembler, BackPressure, set[int], int],
) -> None:
    assembler, _, _, _ = parts
    assert assembler.tick(now=T0 + timedelta(seconds=1)) == []
    assert len(assembler.tick(now=T0 + timedelta(seconds=2))) == 1


def test_a_study_stays_while_its_association_is_open(
    parts: tuple[StudyAssembler, BackPressure, set[int], int],
) -> None:
    assembler, _, busy, study_id = parts
    busy.add(study_id)
    assert assembler.tick(now=T0 + timedelta(minutes=5)) == []
    busy.clear()
    assert len(assembler.tick(now=T0 + timedelta(minutes=5))) == 1


def test_touch_restarts_the_quiet_period(parts: tuple[StudyAssembler, BackPressure, set[int], int]) -> None:
    assembler, _, _, study_id = parts
    released = T0 + timedelta(seconds=10)
    assembler.touch([study_id], now=released)
    assembler.touch([study_id], now=T0)  # never moves the clock back
    assert assembler.tick(now=released + timedelta(seconds=1.5)) == []
    assert len(assembler.tick(now=released + timedelta(seconds=2))) == 1


def test_a_study_stamped_before_a_clock_step_back_is_not_held_for_the_step(
    parts: tuple[StudyAssembler, BackPressure, set[int], int],
) -> None:
    """The host's clock stepped back an hour after the study came in: its last-received time now lies an
    hour ahead, and it must not wait for that hour to come round again."""
    assembler, _, busy, study_id = parts
    stepped_back = T0 - timedelta(hours=1)
    busy.add(study_id)
    assert assembler.tick(now=stepped_back) == []  # still sending: held, as always
    busy.clear()
    assert len(assembler.tick(now=stepped_back)) == 1


def test_broker_failure_puts_the_job_back_and_raises_back_pressure(
    parts: tuple[StudyAssembler, BackPressure, set[int], int], monkeypatch: pytest.MonkeyPatch
) -> None:
    assembler, pressure, _, _ = parts

    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr("service.core.queue.enqueue", refuse)
    assert assembler.tick(now=T0 + timedelta(seconds=5)) == []
    assert not pressure.broker_ok
    with assembler._sessions() as session:
        assert session.scalars(select(Job.status)).one() == JobStatus.RECEIVED
    monkeypatch.undo()
    assert len(assembler.tick(now=T0 + timedelta(seconds=6))) == 1
    assert pressure.broker_ok


def test_busy_hold_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from service.scp import handlers
    from service.scp.handlers import AssociationStudies

    clock = [1000.0]
    monkeypatch.setattr(handlers.time, "monotonic", lambda: clock[0])
    studies = AssociationStudies(hold_seconds=300)
    assoc = object()
    studies.add(assoc, 7)
    assert studies.busy() == {7}
    clock[0] += 301  # a long-lived association that sent nothing more for this study
    assert studies.busy() == set()
    assert studies.pop(assoc) == {7}


def test_a_released_study_goes_after_the_grace_not_the_quiet_period(
    parts: tuple[StudyAssembler, BackPressure, set[int], int],
) -> None:
    assembler, _, _, study_id = parts
    released = T0 + timedelta(seconds=0.05)
    assembler.release([study_id], now=released)
    assert assembler.tick(now=released + timedelta(seconds=0.1)) == []  # grace 0.2 s
    assert len(assembler.tick(now=released + timedelta(seconds=0.2))) == 1


def test_an_instance_after_the_release_brings_back_the_quiet_period(
    parts: tuple[StudyAssembler, BackPressure, set[int], int],
) -> None:
    """Another association sent to the study after the first was released: it is not done yet."""
    assembler, _, _, study_id = parts
    assembler.release([study_id], now=T0)
    later = T0 + timedelta(seconds=0.1)
    with assembler._sessions.begin() as session:
        session.get_one(Study, study_id).last_received_at = later  # as the intake stamps an instance
    assert assembler.tick(now=T0 + timedelta(seconds=1)) == []
    assert len(assembler.tick(now=later + timedelta(seconds=2))) == 1


def test_an_aborted_association_keeps_the_quiet_period(
    parts: tuple[StudyAssembler, BackPressure, set[int], int],
) -> None:
    assembler, _, _, study_id = parts
    assembler.touch([study_id], now=T0)
    assert assembler.tick(now=T0 + timedelta(seconds=1)) == []


def test_a_late_instance_runs_the_study_again_once_after_the_running_job(
    parts: tuple[StudyAssembler, BackPressure, set[int], int],
) -> None:
    """The study's first job is running when more of it arrives: the new job waits for it to finish,
    never running beside it, then goes once."""
    assembler, _, _, study_id = parts
    assembler.release([study_id], now=T0)
    (first,) = assembler.tick(now=T0 + timedelta(seconds=1))
    late = T0 + timedelta(seconds=2)
    with assembler._sessions.begin() as session:
        session.get_one(Job, first).status = JobStatus.RUNNING
        session.get_one(Study, study_id).last_received_at = late
        session.add(Job(study_id=study_id, status=JobStatus.RECEIVED, received_at=late, created_at=late))
    assembler.release([study_id], now=late)
    assert assembler.tick(now=late + timedelta(seconds=5)) == []  # first still running
    with assembler._sessions.begin() as session:
        session.get_one(Job, first).status = JobStatus.DONE
    (second,) = assembler.tick(now=late + timedelta(seconds=6))
    assert second != first
    assert assembler.tick(now=late + timedelta(seconds=7)) == []


def test_the_assembler_thread_wakes_at_the_end_of_the_grace(tmp_path: Path) -> None:
    """A release is picked up after its grace, not after the next of the thread's (long) intervals."""
    import time

    settings = load_settings(data_dir=tmp_path, study_quiet_seconds=60.0, spool_min_free_bytes=0)
    migrate(settings)
    sessions = make_session_factory(settings)
    now = datetime.now(UTC)
    with sessions.begin() as session:
        study = Study(study_instance_uid="1.2.4", last_received_at=now)
        session.add(study)
        session.flush()
        session.add(Job(study_id=study.id, status=JobStatus.RECEIVED, received_at=now, created_at=now))
        study_id = study.id
    assembler = StudyAssembler(settings, sessions, make_celery(settings))
    assembler.start(interval=30.0)
    try:
        started = time.monotonic()
        assembler.release([study_id])
        deadline = started + 10
        status = JobStatus.RECEIVED
        while status == JobStatus.RECEIVED and time.monotonic() < deadline:
            time.sleep(0.02)
            with sessions() as session:
                status = JobStatus(session.scalars(select(Job.status)).one())
        assert status == JobStatus.QUEUED
        assert time.monotonic() - started < 5  # well under the 30 s interval and 60 s quiet period
    finally:
        assembler.stop()
