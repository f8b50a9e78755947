"""Sending one result object to one destination and recording what happened."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from sqlalchemy import CursorResult, func, select, text, update
from sqlalchemy.exc import InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from service.core.deliveries import ATTEMPT_LEASE, retry_delay
from service.core.errors import PermanentError, TransientError
from service.core.models import Delivery, DeliveryAttempt
from service.core.settings import Settings
from service.core.status import OPEN_DELIVERY_STATUSES, DeliveryStatus, ReasonCode
from service.core.tls import client_context
from service.dicomnet.scu import c_store

log = logging.getLogger(__name__)


def deliver(
    delivery_id: int, settings: Settings, sessions: sessionmaker[Session], attempt: int | None = None
) -> DeliveryStatus | None:
    """Make one C-STORE attempt of a delivery and record its outcome and, on failure, when it is due again.

    ``attempt``: how many attempts the row had when its message was sent. The attempt runs only if that
    is still so (a compare-and-set that claims it): a message sent twice, or one that outlived a newer
    attempt, does nothing. Without it (an older message) the attempt runs if the delivery is due.
    Returns the delivery's new status, or None when this message had nothing to do.
    """
    claimed = _through_restarts(sessions, _claim, sessions, delivery_id, attempt)
    if claimed is None:
        return None
    attempt, output_path, target = claimed
    path = settings.output_dir / output_path
    attempts = attempt + 1
    started = datetime.now(UTC)
    try:
        if not path.is_file():
            raise PermanentError(ReasonCode.SPOOL_FILE_MISSING, "output file missing")
        c_store(
            path,
            ae_title=target[0],
            host=target[1],
            port=target[2],
            calling_ae_title=settings.sender_ae_title,
            tls_context=client_context(settings) if _uses_tls(settings, target) else None,
        )
    except TransientError as exc:
        tries = _through_restarts(sessions, _attempts_since_replay, sessions, delivery_id) + 1
        if tries > settings.delivery_max_retries:
            _record(sessions, delivery_id, attempts, DeliveryStatus.DEAD_LETTER, str(exc), started)
            log.error(
                "delivery=%d to ae=%s dead-lettered after %d attempts", delivery_id, target[0], attempts
            )
            return DeliveryStatus.DEAD_LETTER
        due = datetime.now(UTC) + retry_delay(settings, tries)
        _record(sessions, delivery_id, attempts, DeliveryStatus.RETRYING, str(exc), started, due)
        log.warning(
            "delivery=%d to ae=%s retrying reason=%s due=%s",
            delivery_id,
            target[0],
            exc.reason,
            due.isoformat(timespec="seconds"),
        )
        return DeliveryStatus.RETRYING
    except PermanentError as exc:
        _record(sessions, delivery_id, attempts, DeliveryStatus.DEAD_LETTER, str(exc), started)
        log.error("delivery=%d to ae=%s dead-lettered reason=%s", delivery_id, target[0], exc.reason)
        return DeliveryStatus.DEAD_LETTER
    _record(sessions, delivery_id, attempts, DeliveryStatus.DELIVERED, None, started)
    log.info("delivery=%d to ae=%s delivered", delivery_id, target[0])
    return DeliveryStatus.DELIVERED


def _claim(
    sessions: sessionmaker[Session], delivery_id: int, attempt: int | None
) -> tuple[int, str, tuple[str, str, int]] | None:
    """Take attempt ``attempt + 1`` of the delivery (compare-and-set on its attempt count); None when this
    message has nothing to do. Returns the count claimed from, the output's path and the destination."""
    now = datetime.now(UTC)
    with sessions.begin() as session:
        row = session.get(Delivery, delivery_id)
        if row is None or row.status not in OPEN_DELIVERY_STATUSES:
            return None
        if attempt is None:
            attempt = row.attempts
            if row.next_attempt_at is not None and row.next_attempt_at > now:
                return None
        claim: CursorResult[object] = session.execute(  # type: ignore[assignment]
            update(Delivery)
            .where(
                Delivery.id == delivery_id,
                Delivery.attempts == attempt,
                Delivery.status.in_([str(s) for s in OPEN_DELIVERY_STATUSES]),
            )
            .values(attempts=attempt + 1, next_attempt_at=now + ATTEMPT_LEASE, dispatched_at=None)
        )
        if claim.rowcount == 0:
            log.info("delivery=%d attempt %d already made; message dropped", delivery_id, attempt + 1)
            return None
        return attempt, row.output_path, (row.ae_title, row.host, row.port)


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


def _uses_tls(settings: Settings, target: tuple[str, str, int]) -> bool:
    # Deliveries keep the address they were made for; TLS follows the destination's current setting.
    return any((d.ae_title, d.host, d.port) == target and d.tls for d in settings.destinations)


def _record(
    sessions: sessionmaker[Session],
    delivery_id: int,
    attempts: int,
    status: DeliveryStatus,
    error: str | None,
    started: datetime,
    due: datetime | None = None,
) -> None:
    """The attempt's outcome, and the delivery's new state unless a later attempt has taken it over.

    A C-STORE that got through is recorded whatever happened meanwhile: the PACS has the object.
    """
    # The C-STORE's outcome must not be lost to a database restart: a delivered object left unrecorded
    # would be sent again once its lease runs out.
    _through_restarts(sessions, _write_outcome, sessions, delivery_id, attempts, status, error, started, due)


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


def _write_outcome(
    sessions: sessionmaker[Session],
    delivery_id: int,
    attempts: int,
    status: DeliveryStatus,
    error: str | None,
    started: datetime,
    due: datetime | None,
) -> None:
    now = datetime.now(UTC)
    with sessions.begin() as session:
        session.add(
            DeliveryAttempt(
                delivery_id=delivery_id, started_at=started, finished_at=now, outcome=status, error=error
            )
        )
        stmt = update(Delivery).where(
            Delivery.id == delivery_id, Delivery.status.in_([str(s) for s in OPEN_DELIVERY_STATUSES])
        )
        if status != DeliveryStatus.DELIVERED:
            stmt = stmt.where(Delivery.attempts == attempts)
        values: dict[str, object] = {
            "status": status,
            "last_error": error,
            "next_attempt_at": due,
            "dispatched_at": None,
        }
        if status == DeliveryStatus.DELIVERED:
            values["delivered_at"] = now
        session.execute(stmt.values(**values))
