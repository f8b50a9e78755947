"""Delivery retries owned by the database: due times in the rows, sent once when due, never a countdown.

SQLite and the embedded filesystem broker (each message is a file); a closed local port is the PACS
that is down.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service.core import deliveries
from service.core.db import make_session_factory, migrate
from service.core.deliveries import resend_lost, retry_delay, send_due
from service.core.models import Delivery, DeliveryAttempt, Job
from service.core.outbox import Outbox
from service.core.queue import make_celery
from service.core.reconciler import reconcile
from service.core.settings import Settings, load_settings
from service.core.status import DeliveryStatus, JobStatus
from tests.support.net import free_port
from tests.support.rows import add_job

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
INTERVAL = timedelta(seconds=30)


def _setup(tmp_path: Path, **overrides: Any) -> tuple[Settings, sessionmaker[Session], Celery]:
    settings = load_settings(data_dir=tmp_path, **overrides)
    migrate(settings)
    return settings, make_session_factory(settings), make_celery(settings)


def _delivery(sessions: sessionmaker[Session], port: int = 104, **row: Any) -> int:
    with sessions.begin() as s:
        job = add_job(
            s, f"1.2.{port}.{len(row)}", status=JobStatus.DONE, finished_at=NOW - timedelta(minutes=1)
        )
        delivery = Delivery(
            job_id=job.id,
            ae_title="PACS",
            host="127.0.0.1",
            port=port,
            sop_instance_uid=f"1.2.3.{port}",
            kind="sr",
            output_path="out.dcm",
            **row,
        )
        s.add(delivery)
        s.flush()
        return delivery.id


def _messages(settings: Settings) -> list[dict[str, Any]]:
    folder = settings.broker_dir / "messages"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.msg"))]


def _deliver_args(settings: Settings) -> list[list[Any]]:
    """The arguments of every cxr.deliver message on the broker (the body is [args, kwargs, embed])."""
    import base64

    found = []
    for message in _messages(settings):
        assert message["headers"]["task"] == "cxr.deliver"
        # Run now: no countdown or ETA.
        assert message["headers"].get("eta") is None and message["headers"].get("countdown") is None
        found.append(json.loads(base64.b64decode(message["body"]))[0])
    return found


def test_a_due_retrying_delivery_is_sent_when_due_and_again_only_once_its_message_is_lost(
    tmp_path: Path,
) -> None:
    settings, sessions, celery = _setup(tmp_path)
    due = _delivery(sessions, status=DeliveryStatus.RETRYING, attempts=2, next_attempt_at=NOW)
    later = _delivery(sessions, port=105, status=DeliveryStatus.RETRYING, next_attempt_at=NOW + INTERVAL)
    _delivery(sessions, port=106, status=DeliveryStatus.DEAD_LETTER, next_attempt_at=None)

    assert send_due(sessions, celery, NOW - timedelta(seconds=1)) == []
    assert send_due(sessions, celery, NOW) == [due]
    assert send_due(sessions, celery, NOW + timedelta(seconds=1)) == []  # its message is out
    # The message carries the attempt number it is for: a copy of it can only make that attempt once.
    assert _deliver_args(settings) == [[due, 2]]

    kwargs = {"queued_deadline": timedelta(minutes=15), "running_deadline": timedelta(minutes=30)}
    # Within a reconcile interval the message may still be on its way: not sent again.
    reconcile(sessions, celery, now=NOW + INTERVAL, resend_after=INTERVAL, delivery_waiting=0, **kwargs)
    assert len(_messages(settings)) == 1
    # Past it without an attempt (Redis lost it, or a dead worker held it): sent again, once.
    t = NOW + INTERVAL + timedelta(seconds=1)
    reconcile(sessions, celery, now=t, resend_after=INTERVAL, delivery_waiting=0, **kwargs)
    reconcile(sessions, celery, now=t + timedelta(seconds=1), resend_after=INTERVAL, **kwargs)
    assert _deliver_args(settings) == [[due, 2], [due, 2]]
    # Messages still waiting in the delivery queue: it may be in line behind them, no copy.
    t += INTERVAL + timedelta(seconds=1)
    assert resend_lost(sessions, celery, t, INTERVAL, waiting=3) == []
    assert resend_lost(sessions, celery, t, INTERVAL, waiting=0) == [due]
    with sessions() as s:
        row = s.get(Delivery, later)
        assert row is not None and row.dispatched_at is None  # not due yet: nothing sent


def test_two_listener_replicas_send_a_due_delivery_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both replicas read the same due row; the one that marks it second must send nothing."""
    settings, sessions, celery = _setup(tmp_path)
    due = _delivery(sessions, status=DeliveryStatus.RETRYING, attempts=1, next_attempt_at=NOW)
    real_cas = Outbox.mark_sent
    other_ran = False

    def other_replica_first(*args: Any) -> bool:
        nonlocal other_ran
        if not other_ran:  # the other replica's whole pass runs between our read and our write
            other_ran = True
            assert send_due(sessions, celery, NOW) == [due]
        return real_cas(*args)

    monkeypatch.setattr(Outbox, "mark_sent", other_replica_first)
    assert send_due(sessions, celery, NOW) == []
    assert _deliver_args(settings) == [[due, 1]]
    # The same for a lost message sent again by two reconcilers.
    later = NOW + 2 * INTERVAL
    other_ran = False

    def other_reconciler_first(*args: Any) -> bool:
        nonlocal other_ran
        if not other_ran:
            other_ran = True
            assert resend_lost(sessions, celery, later, INTERVAL, waiting=0) == [due]
        return real_cas(*args)

    monkeypatch.setattr(Outbox, "mark_sent", other_reconciler_first)
    assert resend_lost(sessions, celery, later, INTERVAL, waiting=0) == []
    assert _deliver_args(settings) == [[due, 1], [due, 1]]


def test_backoff_doubles_up_to_its_cap(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, delivery_retry_base_seconds=5, delivery_retry_max_seconds=30)
    assert [retry_delay(settings, n).total_seconds() for n in range(1, 7)] == [5, 10, 20, 30, 30, 30]


def _output(settings: Settings, shared_dir: Path) -> None:
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    (settings.output_dir / "out.dcm").write_bytes(
        (shared_dir / "dicom/chest/cr-pa-mono1-explicit-le.dcm").read_bytes()
    )


def test_a_failed_attempt_records_its_due_time_and_sends_no_countdown_task(
    tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Celery task makes one attempt against a PACS that is down and returns: the retry is a due
    time in the row, not a countdown task held by this worker (or, with Redis, by its unacked hash)."""
    from service.core import task_names as names
    from worker.app import make_app
    from worker.runtime import Runtime

    settings, sessions, _celery = _setup(
        tmp_path, delivery_retry_base_seconds=5, delivery_max_retries=2, sender_ae_title="CXR_GATEWAY"
    )
    _output(settings, shared_dir)
    down = free_port()  # nothing listens here
    delivery_id = _delivery(
        sessions, port=down, status=DeliveryStatus.PENDING, next_attempt_at=datetime.now(UTC)
    )
    deliver_task = make_app(Runtime(settings=settings, sessions=sessions)).tasks[names.DELIVER]
    published: list[dict[str, Any]] = []
    monkeypatch.setattr(Celery, "send_task", lambda self, *a, **kw: published.append(kw))

    before = datetime.now(UTC)
    # .get() raises what the task raised (apply alone keeps it in the result, and the row just stays).
    assert deliver_task.apply(args=[delivery_id, 0]).get() == DeliveryStatus.RETRYING
    with sessions() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        assert (row.status, row.attempts, row.dispatched_at) == (DeliveryStatus.RETRYING, 1, None)
        assert row.next_attempt_at is not None
        assert timedelta(seconds=4) < row.next_attempt_at - before < timedelta(seconds=30)
        assert [a.outcome for a in s.query(DeliveryAttempt).all()] == [DeliveryStatus.RETRYING]
    assert published == []

    # A second copy of the same message (the broker redelivered it) does nothing.
    assert deliver_task.apply(args=[delivery_id, 0]).get() is None
    # The scheduler's message for attempt 2 makes it; the third failure is past the 2 retries allowed.
    assert deliver_task.apply(args=[delivery_id, 1]).get() == DeliveryStatus.RETRYING
    assert deliver_task.apply(args=[delivery_id, 2]).get() == DeliveryStatus.DEAD_LETTER
    with sessions() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        assert (row.status, row.attempts, row.next_attempt_at) == (DeliveryStatus.DEAD_LETTER, 3, None)
    assert published == [] and _messages(settings) == []


def test_a_job_whose_database_went_away_is_sent_again_at_once_not_as_a_countdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: Celery's retry with its default 3-minute countdown (the PostgreSQL fault run waited 181 s)."""
    from sqlalchemy.exc import OperationalError

    import worker.tasks
    from service.core import task_names as names
    from worker.app import make_app
    from worker.runtime import Runtime

    settings, sessions, _celery = _setup(tmp_path)
    with sessions.begin() as s:
        add_job(s, id="j" * 32, status=JobStatus.RUNNING, attempts=1)
    app = make_app(Runtime(settings=settings, sessions=sessions))

    def database_restarting(*args: object, **kwargs: object) -> list[int]:
        raise OperationalError("UPDATE jobs", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(worker.tasks, "process_study", database_restarting)
    published: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    monkeypatch.setattr(Celery, "send_task", lambda self, *a, **kw: published.append((a, kw)))
    app.tasks[names.PROCESS_STUDY].apply(args=["j" * 32])
    ((args, kwargs),) = published
    assert args == ("cxr.process_study",) and kwargs["args"] == ["j" * 32]
    assert kwargs.get("countdown") is None and kwargs.get("eta") is None
    with sessions() as s:
        assert s.get(Job, "j" * 32).status == JobStatus.RUNNING  # type: ignore[union-attr]


def test_an_attempt_whose_database_restarts_waits_for_it_instead_of_losing_the_message(
    tmp_path: Path, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the claim's OperationalError failed the task, and the delivery waited a reconcile interval
    for its message to be sent again (the PostgreSQL fault run took 41.8 s instead of 9.9 s)."""
    from sqlalchemy.exc import OperationalError

    import worker.delivery

    settings, sessions, _celery = _setup(tmp_path, sender_ae_title="CXR_GATEWAY")
    _output(settings, shared_dir)
    delivery_id = _delivery(
        sessions, port=free_port(), status=DeliveryStatus.PENDING, next_attempt_at=datetime.now(UTC)
    )
    real_claim = worker.delivery._claim
    calls = 0

    def restarting_once(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OperationalError("UPDATE deliveries", {}, Exception("terminating connection"))
        return real_claim(*args)

    monkeypatch.setattr(worker.delivery, "_claim", restarting_once)
    assert worker.delivery.deliver(delivery_id, settings, sessions, 0) == DeliveryStatus.RETRYING
    with sessions() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None and (row.status, row.attempts) == (DeliveryStatus.RETRYING, 1)
    assert calls == 2


def test_the_delivery_state_machine_moves_only_along_its_transitions(tmp_path: Path) -> None:
    _settings, sessions, _celery = _setup(tmp_path)
    delivery_id = _delivery(sessions, status=DeliveryStatus.DEAD_LETTER, next_attempt_at=None)
    with sessions.begin() as s:
        # Asking for a move the machine does not have is a bug, whatever the row holds.
        dead, delivered = [DeliveryStatus.DEAD_LETTER], [DeliveryStatus.DELIVERED]
        with pytest.raises(deliveries.ForbiddenTransition):
            deliveries.transition(s, delivery_id, DeliveryStatus.RETRYING, expected=dead)
        with pytest.raises(deliveries.ForbiddenTransition):
            deliveries.transition(s, delivery_id, DeliveryStatus.PENDING, expected=delivered)
        # A dead letter moves only by a replay.
        assert not deliveries.transition(s, delivery_id, DeliveryStatus.DELIVERED)
        assert deliveries.transition(s, delivery_id, DeliveryStatus.PENDING, last_error=None)
        assert deliveries.transition(s, delivery_id, DeliveryStatus.DELIVERED, now=NOW)
        # Delivered is final: nothing moves it, not even a replay.
        assert not deliveries.transition(s, delivery_id, DeliveryStatus.PENDING)
        assert not deliveries.transition(s, delivery_id, DeliveryStatus.DEAD_LETTER)
    with sessions() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        assert (row.status, row.delivered_at.replace(tzinfo=UTC)) == (DeliveryStatus.DELIVERED, NOW)


def test_each_worker_app_runs_its_tasks_on_its_own_runtime(tmp_path: Path, shared_dir: Path) -> None:
    """The flaky failure at 042920b: Celery registers a task on every app created later in the process
    unless told otherwise, so a second worker app (here: another test's) could run the first one's
    deliver task, on the first one's database, and leave its own row untouched."""
    from celery import _state

    from service.core import task_names as names
    from worker.app import make_app
    from worker.runtime import Runtime

    finalizers = set(_state._on_app_finalizers)
    runs = []
    for name in ("first", "second"):
        settings, sessions, _celery = _setup(tmp_path / name, sender_ae_title="CXR_GATEWAY")
        _output(settings, shared_dir)
        delivery_id = _delivery(
            sessions, port=free_port(), status=DeliveryStatus.PENDING, next_attempt_at=datetime.now(UTC)
        )
        runs.append((make_app(Runtime(settings=settings, sessions=sessions)), sessions, delivery_id))
    assert set(_state._on_app_finalizers) == finalizers  # nothing registered process-wide
    (first, first_db, first_id), (second, second_db, second_id) = runs
    assert first_id == second_id  # a fresh database each: the same row id, so a mix-up would not show
    assert second.tasks[names.DELIVER].apply(args=[second_id, 0]).get() == DeliveryStatus.RETRYING
    for sessions, attempts in ((first_db, 0), (second_db, 1)):
        with sessions() as s:
            row = s.get(Delivery, first_id)
            assert row is not None and row.attempts == attempts
    assert first.tasks[names.DELIVER] is not second.tasks[names.DELIVER]
