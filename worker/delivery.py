"""Sending one result object to one destination and recording what happened."""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from service.core.models import Delivery, DeliveryAttempt
from service.core.settings import Settings
from service.core.status import DeliveryStatus, ReasonCode
from service.core.tls import client_context
from worker.dicom.scu import c_store
from worker.errors import PermanentError, TransientError

log = logging.getLogger(__name__)


def deliver(delivery_id: int, settings: Settings, sessions: sessionmaker[Session]) -> None:
    """C-STORE one output; raises TransientError for the caller to retry, records everything else."""
    with sessions.begin() as session:
        row = session.get(Delivery, delivery_id)
        if row is None or row.status == DeliveryStatus.DELIVERED:
            return
        row.attempts += 1
        path = settings.output_dir / row.output_path
        target = (row.ae_title, row.host, row.port)
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
        _record(sessions, delivery_id, DeliveryStatus.RETRYING, str(exc), started)
        log.warning("delivery=%d to ae=%s retrying reason=%s", delivery_id, target[0], exc.reason)
        raise
    except PermanentError as exc:
        _record(sessions, delivery_id, DeliveryStatus.DEAD_LETTER, str(exc), started)
        log.error("delivery=%d to ae=%s dead-lettered reason=%s", delivery_id, target[0], exc.reason)
        return
    _record(sessions, delivery_id, DeliveryStatus.DELIVERED, None, started)
    log.info("delivery=%d to ae=%s delivered", delivery_id, target[0])


def _uses_tls(settings: Settings, target: tuple[str, str, int]) -> bool:
    # Deliveries keep the address they were made for; TLS follows the destination's current setting.
    return any((d.ae_title, d.host, d.port) == target and d.tls for d in settings.destinations)


def give_up(delivery_id: int, sessions: sessionmaker[Session], error: str) -> None:
    """Retries exhausted: park the delivery where the dashboard shows it for replay."""
    _record(sessions, delivery_id, DeliveryStatus.DEAD_LETTER, error)


def _record(
    sessions: sessionmaker[Session],
    delivery_id: int,
    status: DeliveryStatus,
    error: str | None,
    started: datetime | None = None,
) -> None:
    """The delivery's new state, and the attempt that led to it (``started``: when it began)."""
    with sessions.begin() as session:
        row = session.get(Delivery, delivery_id)
        if row is None:
            return
        row.status = status
        row.last_error = error
        now = datetime.now(UTC)
        if status == DeliveryStatus.DELIVERED:
            row.delivered_at = now
        if started is not None:
            session.add(
                DeliveryAttempt(
                    delivery_id=delivery_id, started_at=started, finished_at=now, outcome=status, error=error
                )
            )
        elif row.history:
            # Giving up after the last retry: that attempt is where the delivery ended.
            row.history[-1].outcome = status
