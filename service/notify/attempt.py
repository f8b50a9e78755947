"""One send of one notification, as the worker's ``cxr.notify`` task makes it (plain function, no Celery).

claim (pending/failed_retrying -> sending, a compare-and-set on the attempt count) -> build and send ->
record (sending -> sent | failed_retrying with a due time | dead) and an attempt row. Logs carry the
notification and job ids, the channel name and a reason code: never the peer's text or patient data.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.core.models import Job, Notification, NotificationAttempt
from service.core.notifications import NotificationStatus, transition
from service.core.settings import Settings
from service.notify.channels import Outcome, Verdict, send
from service.notify.config import Priority
from service.notify.dispatch import OUTBOX
from service.notify.fhir import FhirInvalid
from service.notify.message import Urgent

log = logging.getLogger(__name__)

# Beyond the channel's own time-out: how long a claimed send may take before the row is due again.
LEASE_SLACK = timedelta(seconds=60)


def retry_delay(settings: Settings, tries: int) -> timedelta:
    """How long after its ``tries``-th failed try a notification is due again (capped backoff)."""
    seconds = settings.notify_retry_base_seconds * (2 ** max(tries - 1, 0))
    return timedelta(seconds=min(seconds, settings.notify_retry_max_seconds))


def attempt(
    notification_id: int, settings: Settings, sessions: sessionmaker[Session], attempts: int | None = None
) -> NotificationStatus | None:
    """Make one attempt; returns the new status, or None when this message had nothing to do (another
    attempt took it, or it is not due)."""
    claimed = _claim(sessions, settings, notification_id, attempts)
    if claimed is None:
        return None
    count, tries, channel_name, msg = claimed
    channel = next((c for c in settings.notify_channels if c.name == channel_name), None)
    started = datetime.now(UTC)
    clock = time.perf_counter()
    if channel is None:
        outcome = Outcome(Verdict.DEAD, "channel_not_configured")
    else:
        try:
            outcome = send(channel, msg, started)
        except FhirInvalid as exc:
            outcome = Outcome(Verdict.DEAD, "fhir_invalid", str(exc)[:1000])
        except Exception as exc:  # a bug or an unreadable setting costs this try, not the worker
            log.exception("notification=%d send crashed", notification_id)
            outcome = Outcome(Verdict.RETRY, "internal_error", type(exc).__name__)
    elapsed_ms = (time.perf_counter() - clock) * 1000
    status = _record(sessions, settings, notification_id, count, tries, outcome, started)
    log_level = logging.INFO if status == NotificationStatus.SENT else logging.WARNING
    log.log(
        log_level,
        "notification=%d job=%s channel=%s %s reason=%s ms=%.0f",
        notification_id,
        msg.job_id,
        channel_name,
        status,
        outcome.reason,
        elapsed_ms,
    )
    return status


def _claim(
    sessions: sessionmaker[Session], settings: Settings, notification_id: int, attempts: int | None
) -> tuple[int, int, str, Urgent] | None:
    now = datetime.now(UTC)
    with sessions.begin() as session:

        def hold(row: Notification, count: int) -> bool:
            channels = settings.notify_channels
            timeout = next((c.timeout_seconds for c in channels if c.name == row.channel), 0.0)
            return transition(
                session,
                notification_id,
                NotificationStatus.SENDING,
                if_attempts=count,
                now=now,
                attempts=count + 1,
                tries=row.tries + 1,
                next_attempt_at=now + timedelta(seconds=timeout) + LEASE_SLACK,
                dispatched_at=None,
            )

        taken = OUTBOX.take(session, notification_id, attempts, now, hold)
        if taken is None:
            return None
        row, count = taken
        session.refresh(row)
        return count + 1, row.tries, row.channel, urgent(session, row)


def urgent(session: Session, row: Notification) -> Urgent:
    """The builders' input from a notification row, its job and its study."""
    job = session.get(Job, row.job_id)
    assert job is not None
    study = job.study
    f = row.finding
    return Urgent(
        notification_id=row.id,
        job_id=row.job_id,
        revision=row.revision,
        rule=row.rule,
        priority=Priority(row.priority),
        label=str(f["label"]),
        score=float(f["score"]),
        score_kind=str(f.get("score_kind") or "score"),
        min_score=f.get("min_score"),
        sop_instance_uid=str(f.get("sop_instance_uid") or ""),
        study_instance_uid=study.study_instance_uid,
        accession_number=study.accession_number,
        patient_id=study.patient_id,
        patient_name=study.patient_name,
        bundle_name=str(f.get("bundle_name") or ""),
        bundle_version=str(f.get("bundle_version") or job.bundle_version or ""),
        observed_at=job.finished_at or row.created_at,
    )


def _record(
    sessions: sessionmaker[Session],
    settings: Settings,
    notification_id: int,
    count: int,
    tries: int,
    outcome: Outcome,
    started: datetime,
) -> NotificationStatus:
    now = datetime.now(UTC)
    error = f"{outcome.reason}: {outcome.detail}".strip(": ") if outcome.verdict != Verdict.SENT else None
    values: dict[str, Any]
    if outcome.verdict == Verdict.SENT:
        status, values = NotificationStatus.SENT, {"last_error": None}
    elif outcome.verdict == Verdict.RETRY and tries <= settings.notify_max_retries:
        due = now + retry_delay(settings, tries)
        status, values = NotificationStatus.FAILED_RETRYING, {"last_error": error, "next_attempt_at": due}
    else:
        status, values = NotificationStatus.DEAD, {"last_error": error}
    with sessions.begin() as session:
        session.add(
            NotificationAttempt(
                notification_id=notification_id,
                started_at=started,
                finished_at=now,
                outcome=status,
                reason=outcome.reason[:40],
                error=outcome.detail[:2000] or None,
            )
        )
        # Only while this attempt still holds the row (its lease may have lapsed and another taken it).
        transition(session, notification_id, status, if_attempts=count, now=now, **values)
    return status
