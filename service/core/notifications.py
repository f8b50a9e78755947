"""The state machine of an urgent-finding notification, with its one transition function.

    pending ──claim──▶ sending ──ACK / 2xx──▶ sent
       ▲                 │  ▲
       │                 │  └──claim── failed_retrying ◀──transient (AE, 500, timeout), lease lapsed
       │                 └──permanent (AR, 422) or retries spent──▶ dead
       └──────────── admin replay ─────────────────────────────────────┘

Every move is one compare-and-set UPDATE on the row's current state (and, where given, its attempt
count): the listener's scheduler in every replica and any number of workers may race, and exactly one of
them moves the row. ``sending`` holds a lease (``next_attempt_at``): a worker that died mid-send leaves
the row there until the lease lapses, then the scheduler moves it to ``failed_retrying``.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy.orm import Session

from service.core.models import Notification
from service.core.outbox import ForbiddenTransition, StateMachine


class NotificationStatus(StrEnum):
    PENDING = "pending"
    SENDING = "sending"
    SENT = "sent"
    FAILED_RETRYING = "failed_retrying"
    DEAD = "dead"


S = NotificationStatus
# The only moves there are: target -> the states it may be reached from.
ALLOWED_FROM: dict[NotificationStatus, frozenset[NotificationStatus]] = {
    S.SENDING: frozenset({S.PENDING, S.FAILED_RETRYING}),
    S.SENT: frozenset({S.SENDING}),
    S.FAILED_RETRYING: frozenset({S.SENDING}),
    S.DEAD: frozenset({S.SENDING}),
    S.PENDING: frozenset({S.DEAD}),  # an admin's replay
}
# Waiting for an attempt: a due time in next_attempt_at, a message to the broker once due.
OPEN = frozenset({S.PENDING, S.FAILED_RETRYING})
FINAL = frozenset({S.SENT, S.DEAD})
MACHINE = StateMachine(Notification, "notification", ALLOWED_FROM)
# A move the state machine does not have (a bug in the caller, never a race).
TransitionNotAllowed = ForbiddenTransition


def allowed(source: NotificationStatus, target: NotificationStatus) -> bool:
    return MACHINE.allowed(source, target)


def transition(
    session: Session,
    notification_id: int,
    to: NotificationStatus,
    *,
    expected: Iterable[NotificationStatus] | None = None,
    if_attempts: int | None = None,
    now: datetime | None = None,
    **values: Any,
) -> bool:
    """Move the notification to ``to`` if it is in one of ``expected`` (default: every state ``to`` may be
    reached from) and, with ``if_attempts``, still has that attempt count; set ``values`` with it.

    Returns True if this call moved it (False: another process moved it first). Raises
    TransitionNotAllowed for an ``expected`` state from which ``to`` cannot be reached.
    """
    now = now or datetime.now(UTC)
    values = {"updated_at": now, **values}
    if to == S.SENT:
        values.setdefault("sent_at", now)
    if to in FINAL:
        values.setdefault("next_attempt_at", None)
    if to != S.SENDING:
        values.setdefault("dispatched_at", None)
    only_if = None if if_attempts is None else Notification.attempts == if_attempts
    return MACHINE.move(session, notification_id, to, expected=expected, only_if=only_if, values=values)
