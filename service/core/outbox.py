"""The one mechanism behind every row the gateway sends by task name (deliveries, notifications) and
every state machine (jobs and pulls too): a transition is one compare-and-set UPDATE, and a send is
owned by the database, not the broker.

- :class:`StateMachine`: a model and its allowed-moves table (target -> the states it may be reached
  from); :meth:`StateMachine.move` checks the move, then :func:`compare_and_set`.
- :class:`Outbox`: rows that own their due time (``next_attempt_at``) and a mark of a message sent
  (``dispatched_at``). A scheduler sends each due row once (a compare-and-set on ``dispatched_at``, so
  replicas side by side send it once), a message that never led to an attempt is sent again, and a
  worker takes an attempt only if the attempt count its message carries is still the row's.

A retry is never a countdown/ETA task: with Redis such a task sits unacknowledged in a worker's memory
until the visibility timeout once that worker dies, and it is gone when Redis loses it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Generic, TypeVar

from celery import Celery
from sqlalchemy import ColumnElement, CursorResult, select, update
from sqlalchemy.orm import Session, sessionmaker

from service.core.models import Delivery, Job, Notification, Pull

log = logging.getLogger(__name__)

S = TypeVar("S", bound=StrEnum)
# The models with a status column moved by compare-and-set; those sent by task name.
Stateful = type[Job] | type[Delivery] | type[Notification] | type[Pull]
R = TypeVar("R", Delivery, Notification)


class ForbiddenTransition(ValueError):
    """A caller asked for a move the state machine does not have (a bug in the caller, never a race)."""


def compare_and_set(
    session: Session,
    model: Stateful,
    row_id: int | str,
    states: Iterable[str] | None,
    only_if: ColumnElement[bool] | None,
    values: Mapping[str, object],
) -> bool:
    """Set ``values`` on the row if its status is one of ``states`` (any when None) and it matches
    ``only_if``; True if this call changed it (False: another process moved it first)."""
    stmt = update(model).where(model.id == row_id)
    if states is not None:
        stmt = stmt.where(model.status.in_(sorted(str(s) for s in states)))
    if only_if is not None:
        stmt = stmt.where(only_if)
    result: CursorResult[object] = session.execute(stmt.values(**values))  # type: ignore[assignment]
    return result.rowcount > 0


@dataclass(frozen=True)
class StateMachine(Generic[S]):
    """A model's states and the only moves there are: target -> the states it may be reached from."""

    model: Stateful
    noun: str
    allowed_from: Mapping[S, frozenset[S]]

    def allowed(self, source: S, target: S) -> bool:
        return source in self.allowed_from.get(target, frozenset())

    def move(
        self,
        session: Session,
        row_id: int | str,
        to: S,
        *,
        expected: Iterable[S] | None = None,
        only_if: ColumnElement[bool] | None = None,
        values: Mapping[str, object] | None = None,
    ) -> bool:
        """Move the row to ``to`` if it is in one of ``expected`` (default: every state ``to`` may be
        reached from) and matches ``only_if``, setting ``values`` too; True if it moved.

        Raises :class:`ForbiddenTransition` when ``expected`` names a state that may not move to ``to``.
        """
        sources = self.allowed_from.get(to, frozenset())
        states = sources if expected is None else frozenset(expected)
        if not states or not states <= sources:
            bad = sorted(str(s) for s in states - sources) or ["(none)"]
            raise ForbiddenTransition(f"{self.noun} may not move {'/'.join(bad)} -> {to}")
        return compare_and_set(session, self.model, row_id, states, only_if, {"status": to, **(values or {})})


@dataclass(frozen=True)
class Outbox(Generic[R]):
    """Rows of ``model`` waiting in one of ``open`` states, each sent as ``send(celery, id, attempts)``."""

    model: type[R]
    noun: str
    open: frozenset[str]
    send: Callable[[Celery, int, int], None]
    batch: int
    # A message that carries its attempt count waits for the row's due time too (notifications); when
    # False, only a message without one does (deliveries: a counted message is run as sent).
    counted_waits: bool = True

    def _is_open(self) -> ColumnElement[bool]:
        return self.model.status.in_(sorted(self.open))

    def mark_sent(self, session: Session, row_id: int, dispatched_at: datetime | None, now: datetime) -> bool:
        """Mark the row's message as sent at ``now`` if nobody has since the read (compare-and-set)."""
        m = self.model
        read = m.dispatched_at.is_(None) if dispatched_at is None else m.dispatched_at == dispatched_at
        return compare_and_set(session, m, row_id, self.open, read, {"dispatched_at": now})

    def _send(
        self,
        sessions: sessionmaker[Session],
        celery: Celery,
        rows: Sequence[tuple[int, int, datetime | None]],
        now: datetime,
        why: str = "",
    ) -> list[int]:
        """For each (id, attempts, dispatched_at as read): mark it sent, then enqueue; returns ids sent.

        When the broker refuses, the mark is undone so the next pass tries again, and the pass stops.
        """
        sent: list[int] = []
        for row_id, attempts, dispatched_at in rows:
            with sessions.begin() as session:
                if not self.mark_sent(session, row_id, dispatched_at, now):
                    continue  # another replica (or the worker that made it) sent it first
            try:
                self.send(celery, row_id, attempts)
            except Exception as exc:
                log.warning(
                    "%s=%d not sent (%s: broker away?); next pass", self.noun, row_id, type(exc).__name__
                )
                with sessions.begin() as session:
                    compare_and_set(
                        session,
                        self.model,
                        row_id,
                        None,
                        self.model.dispatched_at == now,
                        {"dispatched_at": dispatched_at},
                    )
                break
            if why:
                log.warning("%s=%d sent again (%s)", self.noun, row_id, why)
            sent.append(row_id)
        return sent

    def _read(
        self, sessions: sessionmaker[Session], *where: ColumnElement[bool]
    ) -> list[tuple[int, int, datetime | None]]:
        m = self.model
        with sessions() as session:
            rows = session.execute(
                select(m.id, m.attempts, m.dispatched_at)
                .where(self._is_open(), *where)
                .order_by(m.next_attempt_at, m.id)
                .limit(self.batch)
            ).all()
        return [(r.id, r.attempts, r.dispatched_at) for r in rows]

    def send_due(
        self, sessions: sessionmaker[Session], celery: Celery, now: datetime, ids: Iterable[int] | None = None
    ) -> list[int]:
        """Send every open row (of ``ids``, when given) whose due time has come and whose message is
        not out yet."""
        m = self.model
        due = [m.next_attempt_at <= now, m.dispatched_at.is_(None)]
        if ids is not None:
            due.append(m.id.in_(list(ids)))
        return self._send(sessions, celery, self._read(sessions, *due), now)

    def resend_lost(
        self, sessions: sessionmaker[Session], celery: Celery, now: datetime, after: timedelta
    ) -> list[int]:
        """Send again, once per ``after``, the rows whose message went out ``after`` ago and never led to
        an attempt (the broker lost it, or a worker that died held it unacknowledged)."""
        rows = self._read(sessions, self.model.dispatched_at < now - after)
        return self._send(sessions, celery, rows, now, "its message never led to an attempt")

    def take(
        self,
        session: Session,
        row_id: int,
        attempts: int | None,
        now: datetime,
        claim: Callable[[R, int], bool],
    ) -> tuple[R, int] | None:
        """A worker's hold on attempt ``attempts + 1`` of an open, due row: ``claim(row, attempts)`` is the
        caller's compare-and-set on that count. None when this message has nothing to do (the row is
        gone, settled or not due, or another attempt took it). Without ``attempts`` (an older message)
        the row's own count is taken, and only a due row is."""
        row = session.get(self.model, row_id)
        if row is None or row.status not in self.open:
            return None
        waits = self.counted_waits or attempts is None
        if attempts is None:
            attempts = row.attempts
        if waits and row.next_attempt_at is not None and row.next_attempt_at > now:
            return None  # not due (an old message, or one sent early by hand)
        if not claim(row, attempts):
            log.info("%s=%d attempt %d already made; message dropped", self.noun, row_id, attempts + 1)
            return None
        return row, attempts
