from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import make_session_factory, migrate
from service.core.models import Job, JobEvent, Worker
from service.core.queue import make_celery
from service.core.reconciler import REQUEUED, reconcile
from service.core.settings import Settings, load_settings
from service.core.status import JobStatus
from tests.support.rows import add_study


def _database_and_broker(tmp_path: Path) -> tuple[Settings, sessionmaker[Session], Celery]:
    """A migrated SQLite database and the embedded filesystem broker (messages land as files)."""
    settings = load_settings(data_dir=tmp_path)
    migrate(settings)
    return settings, make_session_factory(settings), make_celery(settings)


def _worker_row(name: str, **heartbeat: datetime) -> Worker:
    return Worker(
        name=name, pid=1, queues="inference", pool="prefork", concurrency=1, version="0", **heartbeat
    )


def test_stuck_jobs_are_requeued_and_fresh_ones_left(tmp_path: Path) -> None:
    settings, sessions, celery = _database_and_broker(tmp_path)
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    old, fresh = now - timedelta(hours=2), now - timedelta(seconds=5)
    with sessions.begin() as s:
        study_id = add_study(s)
        rows = {
            "stuck-queued": Job(id="a" * 32, study_id=study_id, status=JobStatus.QUEUED, queued_at=old),
            "stuck-running": Job(id="b" * 32, study_id=study_id, status=JobStatus.RUNNING, started_at=old),
            "fresh": Job(id="c" * 32, study_id=study_id, status=JobStatus.RUNNING, started_at=fresh),
            "done": Job(id="d" * 32, study_id=study_id, status=JobStatus.DONE, started_at=old),
        }
        s.add_all(rows.values())
    requeued = reconcile(
        sessions,
        celery,
        queued_deadline=timedelta(minutes=15),
        running_deadline=timedelta(minutes=30),
        now=now,
    )
    assert sorted(requeued) == ["a" * 32, "b" * 32]
    assert len(list((settings.broker_dir / "messages").glob("*.msg"))) == 2
    with sessions() as s:
        assert s.get(Job, "b" * 32).status == JobStatus.QUEUED  # type: ignore[union-attr]
        assert s.get(Job, "c" * 32).status == JobStatus.RUNNING  # type: ignore[union-attr]
        reasons = s.scalars(select(JobEvent.reason_code).where(JobEvent.job_id == "b" * 32)).all()
        assert reasons == [REQUEUED]


def test_running_jobs_of_a_dead_worker_are_requeued_before_the_running_deadline(tmp_path: Path) -> None:
    from service.core.reconciler import WORKER_LOST

    _settings, sessions, celery = _database_and_broker(tmp_path)
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    started = now - timedelta(minutes=3)  # far below the 30 min running deadline
    with sessions.begin() as s:
        s.add(_worker_row("dead@h", last_seen_at=now - timedelta(minutes=2)))
        s.add(_worker_row("alive@h", last_seen_at=now - timedelta(seconds=5)))
        # Stopped cleanly: a hand-back already returned its task to the broker.
        s.add(_worker_row("stopped@h", last_seen_at=now - timedelta(minutes=2), stopped_at=now))
        s.add(_worker_row("history@h", last_seen_at=now - timedelta(days=8)))  # pruned
        study_id = add_study(s)
        for job_id, worker in [("1", "dead@h"), ("2", "alive@h"), ("3", "stopped@h"), ("4", None)]:
            s.add(
                Job(
                    id=job_id * 32,
                    study_id=study_id,
                    status=JobStatus.RUNNING,
                    started_at=started,
                    worker=worker,
                )
            )
        # Already finished by the dead worker before it died: nothing to do.
        s.add(Job(id="5" * 32, study_id=study_id, status=JobStatus.DONE, started_at=started, worker="dead@h"))
    kwargs = {"queued_deadline": timedelta(minutes=15), "running_deadline": timedelta(minutes=30)}
    # Without the heartbeat rule, nothing is old enough yet.
    assert reconcile(sessions, celery, now=now, **kwargs) == []
    assert reconcile(sessions, celery, now=now, worker_lost_after=timedelta(seconds=60), **kwargs) == [
        "1" * 32
    ]
    with sessions() as s:
        assert s.get(Job, "1" * 32).status == JobStatus.QUEUED  # type: ignore[union-attr]
        reasons = s.scalars(select(JobEvent.reason_code).where(JobEvent.job_id == "1" * 32)).all()
        assert reasons == [WORKER_LOST]
        assert s.get(Job, "2" * 32).status == JobStatus.RUNNING  # type: ignore[union-attr]
        assert sorted(s.scalars(select(Worker.name))) == ["alive@h", "dead@h", "stopped@h"]
    # Once it is queued again, the dead worker's name no longer matters.
    assert reconcile(sessions, celery, now=now, worker_lost_after=timedelta(seconds=60), **kwargs) == []


def test_a_job_claimed_by_another_worker_meanwhile_is_left_alone(tmp_path: Path) -> None:
    from service.core.jobs import transition

    _settings, sessions, _celery = _database_and_broker(tmp_path)
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    with sessions.begin() as s:
        s.add(_worker_row("dead@h", last_seen_at=now - timedelta(minutes=5)))
        study_id = add_study(s)
        s.add(Job(id="1" * 32, study_id=study_id, status=JobStatus.RUNNING, started_at=now, worker="other@h"))
    with sessions.begin() as s:
        moved = transition(
            s, "1" * 32, JobStatus.QUEUED, expected=[JobStatus.RUNNING], only_if=Job.worker == "dead@h"
        )
    assert not moved


def test_a_backlog_is_not_a_loss_but_a_job_the_queue_has_passed_is(tmp_path: Path) -> None:
    """500 studies in a minute on a few workers: the last ones wait longer than the queued deadline, and
    re-enqueuing them would only double the backlog. A job whose message the broker lost is different:
    jobs queued after it have started (the queue is first in, first out)."""
    _settings, sessions, celery = _database_and_broker(tmp_path)
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    t = lambda minutes: now - timedelta(minutes=minutes)  # noqa: E731
    with sessions.begin() as s:
        study_id = add_study(s)
        s.add_all(
            [
                # Queued 30 min ago, its message lost: a job queued 25 min ago already ran.
                Job(id="1" * 32, study_id=study_id, status=JobStatus.QUEUED, queued_at=t(30)),
                Job(id="2" * 32, study_id=study_id, status=JobStatus.DONE, queued_at=t(25), started_at=t(5)),
                # Queued 20 min ago, after everything that has started: still in line.
                Job(id="3" * 32, study_id=study_id, status=JobStatus.QUEUED, queued_at=t(20)),
                # Requeued (queued again after it started): says nothing about the queue's progress.
                Job(
                    id="4" * 32, study_id=study_id, status=JobStatus.QUEUED, queued_at=t(19), started_at=t(40)
                ),
            ]
        )
    kwargs = {"queued_deadline": timedelta(minutes=15), "running_deadline": timedelta(minutes=30), "now": now}
    # 40 messages still waiting: only the passed-over job is lost.
    assert reconcile(sessions, celery, waiting=40, **kwargs) == ["1" * 32]
    # Nothing waiting: whatever is still queued past the deadline has no message left.
    assert sorted(reconcile(sessions, celery, waiting=0, **kwargs)) == ["3" * 32, "4" * 32]


def test_two_listener_replicas_requeue_a_job_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both replicas read the same stuck jobs; the one that moves second must find nothing to move, or
    the job gets two messages and runs twice at once."""
    import service.core.reconciler as reconciler

    settings, sessions, celery = _database_and_broker(tmp_path)
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    old = now - timedelta(hours=2)
    with sessions.begin() as s:
        s.add(_worker_row("dead@h", last_seen_at=now - timedelta(minutes=5)))
        study_id = add_study(s)
        s.add(Job(id="1" * 32, study_id=study_id, status=JobStatus.RUNNING, started_at=now, worker="dead@h"))
        s.add(Job(id="2" * 32, study_id=study_id, status=JobStatus.QUEUED, queued_at=old))
        s.add(Job(id="3" * 32, study_id=study_id, status=JobStatus.RUNNING, started_at=old))
    kwargs = {
        "queued_deadline": timedelta(minutes=15),
        "running_deadline": timedelta(minutes=30),
        "worker_lost_after": timedelta(seconds=60),
        "waiting": 0,
    }
    real_transition = reconciler.transition
    other_replica_ran = False

    def other_replica_first(*args: object, **kw: object) -> bool:
        nonlocal other_replica_ran
        if not other_replica_ran:  # the other replica moves everything between our read and our move
            other_replica_ran = True
            assert sorted(
                reconciler.reconcile(sessions, celery, now=now + timedelta(seconds=1), **kwargs)
            ) == [
                "1" * 32,
                "2" * 32,
                "3" * 32,
            ]
        return real_transition(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(reconciler, "transition", other_replica_first)
    assert reconcile(sessions, celery, now=now, **kwargs) == []
    assert len(list((settings.broker_dir / "messages").glob("*.msg"))) == 3  # one message per job
