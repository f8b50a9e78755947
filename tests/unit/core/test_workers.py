"""Worker heartbeats: registration, beats, a clean stop, and how the dashboard reads their state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.db import make_session_factory, migrate
from service.core.models import Job, Study, Worker
from service.core.settings import load_settings
from service.core.status import JobStatus
from service.core.workers import WorkerInfo, WorkerState, list_workers
from worker.heartbeat import Heartbeat

INFO = WorkerInfo(
    name="cxr-1@host",
    pid=1,
    queues=("inference", "delivery"),
    pool="threads",
    concurrency=4,
    device="cpu",
    version="0.1.0",
)


def test_heartbeat_registers_beats_and_marks_a_clean_stop(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    migrate(settings)
    sessions = make_session_factory(settings)
    heartbeat = Heartbeat(sessions, INFO, interval=0.05)
    heartbeat.start()
    with sessions() as s:
        first = s.get(Worker, INFO.name)
        assert first is not None and first.stopped_at is None
        assert (first.queues, first.pool, first.concurrency, first.device) == (
            "inference,delivery",
            "threads",
            4,
            "cpu",
        )
        seen = first.last_seen_at
    # Someone prunes the row while the worker runs: the next beat registers it again.
    with sessions.begin() as s:
        s.delete(s.get(Worker, INFO.name))
    deadline = datetime.now(UTC) + timedelta(seconds=5)
    while datetime.now(UTC) < deadline:
        with sessions() as s:
            row = s.get(Worker, INFO.name)
            if row is not None and row.last_seen_at > seen:
                break
    else:
        pytest.fail("the heartbeat never came back")
    heartbeat.stop()
    with sessions() as s:
        row = s.get(Worker, INFO.name)
        assert row is not None and row.stopped_at is not None


def test_list_workers_tells_alive_lost_and_stopped_apart_and_counts_running_jobs(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    migrate(settings)
    sessions = make_session_factory(settings)
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    common = {"pid": 1, "queues": "inference", "pool": "prefork", "concurrency": 1, "version": "0"}
    with sessions.begin() as s:
        s.add(Worker(name="b-alive", last_seen_at=now - timedelta(seconds=5), **common))
        s.add(Worker(name="a-lost", last_seen_at=now - timedelta(minutes=5), **common))
        s.add(Worker(name="c-stopped", last_seen_at=now - timedelta(minutes=5), stopped_at=now, **common))
        s.add(Worker(name="d-history", last_seen_at=now - timedelta(days=3), **common))
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        s.add(Job(id="1" * 32, study_id=study.id, status=JobStatus.RUNNING, worker="b-alive"))
        s.add(Job(id="2" * 32, study_id=study.id, status=JobStatus.RUNNING, worker="b-alive"))
        s.add(Job(id="3" * 32, study_id=study.id, status=JobStatus.DONE, worker="b-alive"))
    with sessions() as s:
        views = list_workers(s, now, lost_after=timedelta(seconds=60), keep=timedelta(days=1))
    assert [(v.name, v.state, v.running_jobs) for v in views] == [
        ("b-alive", WorkerState.ALIVE, 2),
        ("a-lost", WorkerState.LOST, 0),
        ("c-stopped", WorkerState.STOPPED, 0),
    ]


def test_the_lost_after_period_must_cover_more_than_one_missed_beat() -> None:
    with pytest.raises(ValidationError, match="2 × worker_heartbeat_seconds"):
        load_settings(worker_heartbeat_seconds=30, reconcile_worker_lost_after_seconds=45)
