"""A study's outputs fanned out to its destinations as delivery rows; sending one of them (one C-STORE
attempt) and recording what happened."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import func, select, text
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.core.deliveries import ATTEMPT_LEASE, OUTBOX, retry_delay, transition
from service.core.errors import PermanentError, TransientError
from service.core.models import Delivery, DeliveryAttempt, Job
from service.core.settings import AnyDestination, Settings
from service.core.status import OPEN_DELIVERY_STATUSES, DeliveryStatus, Mode, ReasonCode
from worker.outputs import Output
from worker.senders import batch_sender_for

log = logging.getLogger(__name__)


def fan_out(
    session: Session, job_id: str, outputs: list[Output], destinations: list[AnyDestination], output_dir: Path
) -> list[int]:
    """One delivery row per output and destination that wants it, due now; the ids of those to send.

    A task redelivered after a worker died finds the rows of its first run: they are reused, and those
    already delivered are not sent again. Shadow destinations get no row (nothing of theirs can be sent);
    the job records whether any live destination was there (its mode).
    """
    live = [dest for dest in destinations if dest.mode != Mode.SHADOW]
    job = session.get(Job, job_id)
    if job is not None:
        job.mode = Mode.SHADOW if destinations and not live else Mode.LIVE
    destinations = live
    existing = {
        (d.sop_instance_uid, d.ae_title, d.host, d.port): d
        for d in session.scalars(select(Delivery).where(Delivery.job_id == job_id))
    }
    ids: list[int] = []
    for out in outputs:
        for dest in destinations:
            if not out.wanted_by(dest):
                continue
            delivery = existing.get((out.sop_instance_uid, dest.ae_title, dest.host, dest.port))
            if delivery is None:
                delivery = Delivery(
                    job_id=job_id,
                    ae_title=dest.ae_title,
                    host=dest.host,
                    port=dest.port,
                    sop_instance_uid=out.sop_instance_uid,
                    kind=out.kind,
                    output_path=str(out.path.relative_to(output_dir)),
                    status=DeliveryStatus.PENDING,
                    next_attempt_at=datetime.now(UTC),  # due now: sent by the task or the listener
                )
                session.add(delivery)
                session.flush()
            elif delivery.status == DeliveryStatus.DELIVERED:
                continue
            ids.append(delivery.id)
    return ids


def deliver(
    delivery_id: int, settings: Settings, sessions: sessionmaker[Session], attempt: int | None = None
) -> DeliveryStatus | None:
    """Make one attempt (C-STORE or STOW-RS: worker.senders) of a delivery and record its outcome and,
    on failure, when it is due again.

    ``attempt``: how many attempts the row had when its message was sent. The attempt runs only if that
    is still so (a compare-and-set that claims it): a message sent twice, or one that outlived a newer
    attempt, does nothing. Without it (an older message) the attempt runs if the delivery is due.
    Returns the delivery's new status, or None when this message had nothing to do.
    """
    claimed = claim(delivery_id, sessions, attempt)
    return None if claimed is None else attempt_claimed(delivery_id, claimed, settings, sessions)


# A claimed attempt: the attempt count it was claimed from, the output's path, the destination.
Claim = tuple[int, str, tuple[str, str, int]]


def claim(delivery_id: int, sessions: sessionmaker[Session], attempt: int | None = None) -> Claim | None:
    """Take the delivery's next attempt (see :func:`deliver`); None when there is nothing to do. The
    claim's lease keeps it from being sent again while its attempt runs (in this thread or another)."""
    return _through_restarts(sessions, _claim, sessions, delivery_id, attempt)


def attempt_claimed(
    delivery_id: int, claimed: Claim, settings: Settings, sessions: sessionmaker[Session]
) -> DeliveryStatus:
    """Make the claimed attempt and record its outcome."""
    (status,) = attempt_together([(delivery_id, claimed)], settings, sessions)
    return status


def attempt_together(
    claims: list[tuple[int, Claim]], settings: Settings, sessions: sessionmaker[Session]
) -> list[DeliveryStatus]:
    """Make claimed attempts to one destination together (a study's outputs over one association) and
    record each one's outcome."""
    target = claims[0][1][2]
    started = datetime.now(UTC)
    paths = [settings.output_dir / claimed[1] for _, claimed in claims]
    present = [path for path in paths if path.is_file()]
    sent = dict(zip(present, batch_sender_for(settings, target)(present), strict=True)) if present else {}
    missing = PermanentError(ReasonCode.SPOOL_FILE_MISSING, "output file missing")
    return [
        _settle(
            settings,
            sessions,
            delivery_id,
            target[0],
            _Outcome(claimed[0] + 1, started),
            sent.get(path, missing),
        )
        for (delivery_id, claimed), path in zip(claims, paths, strict=True)
    ]


def _settle(
    settings: Settings,
    sessions: sessionmaker[Session],
    delivery_id: int,
    ae_title: str,
    attempt: _Outcome,
    error: TransientError | PermanentError | None,
) -> DeliveryStatus:
    if isinstance(error, TransientError):
        return _retry_or_give_up(settings, sessions, delivery_id, ae_title, attempt, error)
    if isinstance(error, PermanentError):
        _record(sessions, delivery_id, replace(attempt, status=DeliveryStatus.DEAD_LETTER, error=str(error)))
        log.error("delivery=%d to ae=%s dead-lettered reason=%s", delivery_id, ae_title, error.reason)
        return DeliveryStatus.DEAD_LETTER
    _record(sessions, delivery_id, attempt)
    log.info("delivery=%d to ae=%s delivered", delivery_id, ae_title)
    return DeliveryStatus.DELIVERED


@dataclass(frozen=True)
class _Outcome:
    """One attempt's outcome: the delivery's attempt count with it, and when it is due again (a retry)."""

    attempts: int
    started: datetime
    status: DeliveryStatus = DeliveryStatus.DELIVERED
    error: str | None = None
    due: datetime | None = None


def _retry_or_give_up(
    settings: Settings,
    sessions: sessionmaker[Session],
    delivery_id: int,
    ae_title: str,
    attempt: _Outcome,
    exc: TransientError,
) -> DeliveryStatus:
    """A failure that may pass: due again after the back-off, or dead-lettered past the retries allowed."""
    tries = _through_restarts(sessions, _attempts_since_replay, sessions, delivery_id) + 1
    if tries > settings.delivery_max_retries:
        _record(sessions, delivery_id, replace(attempt, status=DeliveryStatus.DEAD_LETTER, error=str(exc)))
        log.error(
            "delivery=%d to ae=%s dead-lettered after %d attempts", delivery_id, ae_title, attempt.attempts
        )
        return DeliveryStatus.DEAD_LETTER
    due = datetime.now(UTC) + retry_delay(settings, tries)
    _record(sessions, delivery_id, replace(attempt, status=DeliveryStatus.RETRYING, error=str(exc), due=due))
    log.warning(
        "delivery=%d to ae=%s retrying reason=%s due=%s",
        delivery_id,
        ae_title,
        exc.reason,
        due.isoformat(timespec="seconds"),
    )
    return DeliveryStatus.RETRYING


def _claim(
    sessions: sessionmaker[Session], delivery_id: int, attempt: int | None
) -> tuple[int, str, tuple[str, str, int]] | None:
    """Take attempt ``attempt + 1`` of the delivery (compare-and-set on its attempt count); None when this
    message has nothing to do. Returns the count claimed from, the output's path and the destination."""
    now = datetime.now(UTC)
    with sessions.begin() as session:

        def hold(row: Delivery, count: int) -> bool:
            # The status stays as read (pending or retrying); the count, lease and message mark move.
            status = DeliveryStatus(row.status)
            return transition(
                session,
                delivery_id,
                status,
                expected=[status],
                only_if=Delivery.attempts == count,
                attempts=count + 1,
                next_attempt_at=now + ATTEMPT_LEASE,
                dispatched_at=None,
            )

        taken = OUTBOX.take(session, delivery_id, attempt, now, hold)
        if taken is None:
            return None
        row, count = taken
        return count, row.output_path, (row.ae_title, row.host, row.port)


def _attempts_since_replay(sessions: sessionmaker[Session], delivery_id: int) -> int:
    """Attempts on record since the delivery was last dead-lettered (a replay starts a fresh round)."""
    with sessions() as session:
        last_dead = session.scalar(
            select(func.max(DeliveryAttempt.id)).where(
                DeliveryAttempt.delivery_id == delivery_id,
                DeliveryAttempt.outcome == DeliveryStatus.DEAD_LETTER,
            )
        )
        return int(
            session.scalar(
                select(func.count()).where(
                    DeliveryAttempt.delivery_id == delivery_id, DeliveryAttempt.id > (last_dead or 0)
                )
            )
            or 0
        )


def _record(sessions: sessionmaker[Session], delivery_id: int, outcome: _Outcome) -> None:
    """The attempt's outcome, and the delivery's new state unless a later attempt has taken it over.

    A C-STORE that got through is recorded whatever happened meanwhile: the PACS has the object.
    """
    # The C-STORE's outcome must not be lost to a database restart: a delivered object left unrecorded
    # would be sent again once its lease runs out.
    _through_restarts(sessions, _write_outcome, sessions, delivery_id, outcome)


_DATABASE_TRIES = 30
T = TypeVar("T")


def _through_restarts(sessions: sessionmaker[Session], fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)``, tried again (for about a minute) while the database is away (a restart, a fail-over)."""
    for _ in range(_DATABASE_TRIES):
        try:
            return fn(*args)
        except (OperationalError, InterfaceError) as exc:
            log.warning("database away (%s) in %s; waiting for it", type(exc).__name__, fn.__name__)
            wait_for_database(sessions, 2.0)
    return fn(*args)


def wait_for_database(sessions: sessionmaker[Session], seconds: float) -> bool:
    """True once the database answers (within ``seconds``), polling once a second."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            with sessions() as session:
                session.execute(text("SELECT 1"))
            return True
        except (OperationalError, InterfaceError):
            if time.monotonic() >= deadline:
                return False
            time.sleep(1.0)


def _write_outcome(sessions: sessionmaker[Session], delivery_id: int, outcome: _Outcome) -> None:
    now = datetime.now(UTC)
    status = outcome.status
    delivered = status == DeliveryStatus.DELIVERED
    with sessions.begin() as session:
        session.add(
            DeliveryAttempt(
                delivery_id=delivery_id,
                started_at=outcome.started,
                finished_at=now,
                outcome=status,
                error=outcome.error,
            )
        )
        transition(
            session,
            delivery_id,
            status,
            expected=OPEN_DELIVERY_STATUSES,
            only_if=None if delivered else Delivery.attempts == outcome.attempts,
            now=now,
            last_error=outcome.error,
            next_attempt_at=outcome.due,
            dispatched_at=None,
        )
