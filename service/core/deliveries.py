"""The delivery state machine (:func:`transition`), and delivery retries owned by the database: due
times in the rows, messages sent only when due.

A retry is never a countdown/ETA task: with Redis such a task sits unacknowledged in a worker's memory
until the visibility timeout (an hour) once that worker dies, and it is gone when Redis loses it. Instead
each open delivery (pending or retrying) has a due time, ``next_attempt_at``; something that survives any
single process (the listener's scheduler, in every replica) sends the due ones, and a message that never
led to an attempt is sent again, once per reconcile interval. Every move is a compare-and-set on what
was read, so replicas side by side send a delivery's message once, and a worker runs an attempt only if
the attempt number its message carries is still the next one (stale or doubled messages do nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import ColumnElement, CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.core import task_names
from service.core.models import Delivery
from service.core.queue import enqueue
from service.core.settings import Settings
from service.core.status import OPEN_DELIVERY_STATUSES, DeliveryStatus

log = logging.getLogger(__name__)

# How long one C-STORE attempt may take before its delivery is due again (the worker died mid-send).
# Longer than service.dicomnet.scu.c_store's timeouts (30 s each: association, DIMSE, network) together.
ATTEMPT_LEASE = timedelta(seconds=120)
# Due deliveries sent per scheduler pass (the rest wait for the next pass, a second later).
BATCH = 500


# Each state and the states it may move to. An open delivery may be attempted again (a failed attempt
# is due again, or dead-lettered; any attempt may deliver) and sent again now (an admin's replay, put
# back when the broker refuses it); a dead-lettered one only by a replay; a delivered one never moves.
ALLOWED: Mapping[DeliveryStatus, frozenset[DeliveryStatus]] = {
    DeliveryStatus.PENDING: frozenset(DeliveryStatus),
    DeliveryStatus.RETRYING: frozenset(DeliveryStatus),
    DeliveryStatus.DEAD_LETTER: frozenset({DeliveryStatus.PENDING}),
    DeliveryStatus.DELIVERED: frozenset(),
}


class ForbiddenTransition(ValueError):
    """A caller asked for a move the delivery state machine does not have (a bug, not a race)."""


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
    sources = {state for state, targets in ALLOWED.items() if to in targets}
    states = sources if expected is None else set(expected)
    forbidden = states - sources
    if forbidden:
        raise ForbiddenTransition(f"delivery may not move {sorted(forbidden)} -> {to}")
    if to == DeliveryStatus.DELIVERED:
        values.setdefault("delivered_at", now or datetime.now(UTC))
    stmt = update(Delivery).where(
        Delivery.id == delivery_id, Delivery.status.in_([str(s) for s in sorted(states)])
    )
    if only_if is not None:
        stmt = stmt.where(only_if)
    result: CursorResult[object] = session.execute(stmt.values(status=to, **values))  # type: ignore[assignment]
    return result.rowcount > 0


def retry_delay(settings: Settings, attempts: int) -> timedelta:
    """How long after its ``attempts``-th failed attempt a delivery is due again (capped backoff)."""
    seconds = settings.delivery_retry_base_seconds * (2 ** max(attempts - 1, 0))
    return timedelta(seconds=min(seconds, settings.delivery_retry_max_seconds))


def _cas(session: Session, delivery_id: int, dispatched_at: datetime | None, now: datetime) -> bool:
    """Mark the delivery's message as sent at ``now`` if nobody has since the read (compare-and-set)."""
    stmt = update(Delivery).where(
        Delivery.id == delivery_id,
        Delivery.status.in_([str(s) for s in OPEN_DELIVERY_STATUSES]),
        Delivery.dispatched_at.is_(None)
        if dispatched_at is None
        else Delivery.dispatched_at == dispatched_at,
    )
    result: CursorResult[object] = session.execute(stmt.values(dispatched_at=now))  # type: ignore[assignment]
    return result.rowcount > 0


def _send(
    sessions: sessionmaker[Session],
    celery: Celery,
    rows: Iterable[tuple[int, int, datetime | None]],
    now: datetime,
    why: str,
) -> list[int]:
    """For each (id, attempts, dispatched_at as read): claim the send, then enqueue; returns ids sent.

    When the broker refuses, the claim is undone so the next pass tries again, and the pass stops.
    """
    sent: list[int] = []
    for delivery_id, attempts, dispatched_at in rows:
        with sessions.begin() as session:
            if not _cas(session, delivery_id, dispatched_at, now):
                continue  # another replica (or the worker that made it) sent it first
        try:
            enqueue(celery, task_names.DELIVER, delivery_id, attempts)
        except Exception as exc:
            log.warning("delivery=%d not sent (%s: broker away?); next pass", delivery_id, type(exc).__name__)
            with sessions.begin() as session:
                session.execute(
                    update(Delivery)
                    .where(Delivery.id == delivery_id, Delivery.dispatched_at == now)
                    .values(dispatched_at=dispatched_at)
                )
            break
        if why:
            log.warning("delivery=%d sent again (%s)", delivery_id, why)
        sent.append(delivery_id)
    return sent


def send_due(sessions: sessionmaker[Session], celery: Celery, now: datetime) -> list[int]:
    """Send every open delivery whose due time has come and whose message is not out yet."""
    with sessions() as session:
        rows = session.execute(
            select(Delivery.id, Delivery.attempts, Delivery.dispatched_at)
            .where(
                Delivery.status.in_([str(s) for s in OPEN_DELIVERY_STATUSES]),
                Delivery.next_attempt_at <= now,
                Delivery.dispatched_at.is_(None),
            )
            .order_by(Delivery.next_attempt_at)
            .limit(BATCH)
        ).all()
    return _send(sessions, celery, [(r.id, r.attempts, r.dispatched_at) for r in rows], now, "")


def send_ids(sessions: sessionmaker[Session], celery: Celery, ids: Iterable[int], now: datetime) -> list[int]:
    """Send these deliveries now if they are open, due and not sent yet (a worker's fresh outputs)."""
    ids = list(ids)
    if not ids:
        return []
    with sessions() as session:
        rows = session.execute(
            select(Delivery.id, Delivery.attempts, Delivery.dispatched_at)
            .where(
                Delivery.id.in_(ids),
                Delivery.status.in_([str(s) for s in OPEN_DELIVERY_STATUSES]),
                Delivery.next_attempt_at <= now,
                Delivery.dispatched_at.is_(None),
            )
            .order_by(Delivery.id)
        ).all()
    return _send(sessions, celery, [(r.id, r.attempts, r.dispatched_at) for r in rows], now, "")


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
    with sessions() as session:
        rows = session.execute(
            select(Delivery.id, Delivery.attempts, Delivery.dispatched_at)
            .where(
                Delivery.status.in_([str(s) for s in OPEN_DELIVERY_STATUSES]),
                Delivery.dispatched_at < now - after,
            )
            .order_by(Delivery.next_attempt_at)
            .limit(BATCH)
        ).all()
    return _send(
        sessions,
        celery,
        [(r.id, r.attempts, r.dispatched_at) for r in rows],
        now,
        "its message never led to an attempt",
    )
