"""Sending notifications that are due, from the listener's scheduler, as Celery tasks by name.

The same mechanism as deliveries (service.core.outbox): the row owns its due time, the scheduler sends a
message for each due row once (a compare-and-set on ``dispatched_at``), a worker's delivery-queue task
makes one attempt (service.notify.attempt), and a message that never led to an attempt is sent again
after a reconcile interval. A worker that died mid-send leaves its row ``sending`` until the lease in
``next_attempt_at`` lapses; then the row is ``failed_retrying`` and due.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import database_now
from service.core.models import Notification
from service.core.notifications import OPEN, NotificationStatus, transition
from service.core.outbox import Outbox
from service.core.periodic import Periodic
from service.core.settings import Settings

log = logging.getLogger(__name__)

# The task-name contract with the worker (worker/notify_task.py); it runs on the light delivery queue.
NOTIFY_TASK = "cxr.notify"
NOTIFY_QUEUE = "delivery"
BATCH = 200


def _enqueue(celery: Celery, notification_id: int, attempts: int) -> None:
    celery.send_task(
        NOTIFY_TASK,
        args=[notification_id, attempts],
        queue=NOTIFY_QUEUE,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )


OUTBOX = Outbox(Notification, "notification", frozenset(str(s) for s in OPEN), _enqueue, BATCH)


def send_due(sessions: sessionmaker[Session], celery: Celery, now: datetime) -> list[int]:
    """A message for each open notification that is due and has none out yet."""
    return OUTBOX.send_due(sessions, celery, now)


def resend_lost(
    sessions: sessionmaker[Session], celery: Celery, now: datetime, after: timedelta
) -> list[int]:
    """Again, the messages sent ``after`` ago that led to no attempt (a broker or worker lost them)."""
    return OUTBOX.resend_lost(sessions, celery, now, after)


def expire_leases(sessions: sessionmaker[Session], now: datetime) -> list[int]:
    """Sending rows whose lease lapsed (the worker died mid-send): failed_retrying, due now."""
    with sessions() as session:
        rows = session.execute(
            select(Notification.id, Notification.attempts).where(
                Notification.status == NotificationStatus.SENDING, Notification.next_attempt_at < now
            )
        ).all()
    moved: list[int] = []
    for notification_id, attempts in rows:
        with sessions.begin() as session:
            if transition(
                session,
                notification_id,
                NotificationStatus.FAILED_RETRYING,
                if_attempts=attempts,
                now=now,
                next_attempt_at=now,
                last_error="lease_lapsed",
            ):
                moved.append(notification_id)
                log.warning("notification=%d lease lapsed; due again", notification_id)
    return moved


def replay(session: Session, notification_id: int, now: datetime) -> bool:
    """A dead notification back to pending, due now, with a fresh round of retries (the caller audits)."""
    return transition(
        session,
        notification_id,
        NotificationStatus.PENDING,
        now=now,
        tries=0,
        last_error=None,
        next_attempt_at=now,
    )


class Scheduler(Periodic):
    """A daemon thread beside the listener's reconciler: due notifications every ``delivery_poll_seconds``;
    lapsed leases and lost messages every ``reconcile_interval_seconds``. Its clock is the database's."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> None:
        self._sessions = sessions
        self._celery = celery
        self._interval = timedelta(seconds=settings.reconcile_interval_seconds)
        self._enabled = bool(settings.notify_channels)
        self._last_sweep: datetime | None = None
        super().__init__("notify-scheduler", settings.delivery_poll_seconds)

    def start(self) -> None:
        if self._enabled:
            super().start()

    def run_once(self, now: datetime, sweep: bool) -> list[int]:
        if sweep:
            expire_leases(self._sessions, now)
            resend_lost(self._sessions, self._celery, now, self._interval)
        return send_due(self._sessions, self._celery, now)

    def tick(self) -> None:
        now = database_now(self._sessions)
        sweep = self._last_sweep is None or now - self._last_sweep >= self._interval
        if sweep:
            self._last_sweep = now
        self.run_once(now, sweep)
