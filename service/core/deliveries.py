"""The delivery state machine (:func:`transition`), and delivery retries owned by the database: due
times in the rows, messages sent only when due.

A retry is never a countdown/ETA task: with Redis such a task sits unacknowledged in a worker's memory
until the visibility timeout (an hour) once that worker dies, and it is gone when Redis loses it. Instead
each open delivery (pending or retrying) has a due time, ``next_attempt_at``; something that survives any
single process (the listener's scheduler, in every replica) sends the due ones, and a message that never
led to an attempt is sent again, once per reconcile interval. Every move is a compare-and-set on what
was read, so replicas side by side send a delivery's message once, and a worker runs an attempt only if
the attempt number its message carries is still the next one (stale or doubled messages do nothing).
The mechanism is service.core.outbox's, shared with notifications; this module holds the delivery's
moves, its lease and its back-off.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import ColumnElement
from sqlalchemy.orm import Session, sessionmaker

from service.core import task_names
from service.core.models import Delivery
from service.core.outbox import ForbiddenTransition as ForbiddenTransition
from service.core.outbox import Outbox, StateMachine
from service.core.queue import enqueue
from service.core.settings import Settings
from service.core.status import OPEN_DELIVERY_STATUSES, DeliveryStatus

log = logging.getLogger(__name__)

# How long one C-STORE attempt may take before its delivery is due again (the worker died mid-send).
# Longer than a C-STORE's timeouts together (association, DIMSE, network: delivery_timeout_seconds each,
# at most 35 s).
ATTEMPT_LEASE = timedelta(seconds=120)
# Due deliveries sent per scheduler pass (the rest wait for the next pass, a second later).
BATCH = 500


# Each state and the states it may be reached from. An open delivery may be attempted again (a failed
# attempt is due again, or dead-lettered; any attempt may deliver) and sent again now (an admin's
# replay, put back when the broker refuses it); a dead-lettered one only by a replay; a delivered one
# never moves.
_OPEN = frozenset(OPEN_DELIVERY_STATUSES)
ALLOWED_FROM: Mapping[DeliveryStatus, frozenset[DeliveryStatus]] = {
    DeliveryStatus.PENDING: _OPEN | {DeliveryStatus.DEAD_LETTER},
    DeliveryStatus.RETRYING: _OPEN,
    DeliveryStatus.DEAD_LETTER: _OPEN,
    DeliveryStatus.DELIVERED: _OPEN,
}
MACHINE = StateMachine(Delivery, "delivery", ALLOWED_FROM)
OUTBOX = Outbox(
    Delivery,
    "delivery",
    frozenset(str(s) for s in OPEN_DELIVERY_STATUSES),
    lambda celery, delivery_id, attempts: enqueue(celery, task_names.DELIVER, delivery_id, attempts),
    BATCH,
    counted_waits=False,
)


def transition(
    session: Session,
    delivery_id: int,
    to: DeliveryStatus,
    *,
    expected: Iterable[DeliveryStatus] | None = None,
    only_if: ColumnElement[bool] | None = None,
    now: datetime | None = None,
    **values: object,
) -> bool:
    """Move a delivery to ``to`` if it is in one of ``expected`` (default: every state that may move
    there) and matches ``only_if``, setting ``values`` too; True if it moved (a compare-and-set).

    Raises :class:`ForbiddenTransition` when ``expected`` names a state that may not move to ``to``.
    """
    if to == DeliveryStatus.DELIVERED:
        values.setdefault("delivered_at", now or datetime.now(UTC))
    return MACHINE.move(session, delivery_id, to, expected=expected, only_if=only_if, values=values)


def retry_delay(settings: Settings, attempts: int) -> timedelta:
    """How long after its ``attempts``-th failed attempt a delivery is due again (capped backoff)."""
    seconds = settings.delivery_retry_base_seconds * (2 ** max(attempts - 1, 0))
    return timedelta(seconds=min(seconds, settings.delivery_retry_max_seconds))


def send_due(sessions: sessionmaker[Session], celery: Celery, now: datetime) -> list[int]:
    """Send every open delivery whose due time has come and whose message is not out yet."""
    return OUTBOX.send_due(sessions, celery, now)


def send_ids(sessions: sessionmaker[Session], celery: Celery, ids: Iterable[int], now: datetime) -> list[int]:
    """Send these deliveries now if they are open, due and not sent yet (a worker's fresh outputs)."""
    ids = list(ids)
    return OUTBOX.send_due(sessions, celery, now, ids) if ids else []


def resend_lost(
    sessions: sessionmaker[Session],
    celery: Celery,
    now: datetime,
    after: timedelta,
    waiting: int | None,
) -> list[int]:
    """Send again, once per ``after``, the deliveries whose message went out ``after`` ago and never led
    to an attempt (Redis lost it, or a worker that died held it unacknowledged).

    ``waiting``: messages in the broker's delivery queue. While some wait, the message may still be in
    line behind them, and a copy would only lengthen the line: wait until the queue has drained.
    """
    if waiting:
        return []
    return OUTBOX.resend_lost(sessions, celery, now, after)
