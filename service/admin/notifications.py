"""Urgent-finding notifications in the dashboard: the list (page and API), an admin's audited replay of
a dead one, and their Prometheus metrics (from the database at scrape time, like the rest)."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.admin import actions, pages
from service.admin.auth import Principal
from service.admin.deps import DB, Admin, Client, Context, Ctx, User
from service.core.models import Notification, NotificationAttempt
from service.core.notifications import NotificationStatus
from service.notify.dispatch import replay

router = APIRouter()


class NotificationOut(BaseModel):
    id: int
    job_id: str
    rule: str
    channel: str
    kind: str
    priority: str
    finding: str
    score: float
    revision: int
    status: str
    attempts: int
    tries: int
    last_error: str | None
    created_at: datetime
    sent_at: datetime | None
    next_attempt_at: datetime | None

    @classmethod
    def of(cls, row: Notification) -> NotificationOut:
        return cls(
            id=row.id,
            job_id=row.job_id,
            rule=row.rule,
            channel=row.channel,
            kind=row.kind,
            priority=row.priority,
            finding=str(row.finding.get("label", "")),
            score=float(row.finding.get("score", 0.0)),
            revision=row.revision,
            status=row.status,
            attempts=row.attempts,
            tries=row.tries,
            last_error=row.last_error,
            created_at=row.created_at,
            sent_at=row.sent_at,
            next_attempt_at=row.next_attempt_at,
        )


def _list(session: Session, status: str | None, job_id: str | None, limit: int) -> list[Notification]:
    stmt = select(Notification).order_by(Notification.id.desc()).limit(limit)
    if status:
        stmt = stmt.where(Notification.status == status)
    if job_id:
        stmt = stmt.where(Notification.job_id == job_id)
    return list(session.scalars(stmt))


def _replay(ctx: Context, notification_id: int, admin: Principal, client: str) -> Notification:
    with ctx.sessions.begin() as session:
        row = session.get(Notification, notification_id)
        if row is None:
            raise actions.ActionError(404, "notification not found")
        if row.status != NotificationStatus.DEAD:
            raise actions.ActionError(409, f"only a dead notification is replayed (this one is {row.status})")
        if not replay(session, notification_id, datetime.now(UTC)):
            raise actions.ActionError(409, "the notification changed meanwhile; look again")
        actions.audit(
            session,
            admin,
            "replay_notification",
            target_type="notification",
            target_id=str(notification_id),
            detail={"job": row.job_id, "channel": row.channel, "rule": row.rule, "previous_status": "dead"},
            client=client,
        )
        session.refresh(row)
        session.expunge(row)
        return row


@router.get("/api/notifications", response_model=list[NotificationOut], tags=["notifications"])
def api_notifications(
    session: DB,
    user: User,
    status: Annotated[NotificationStatus | None, Query()] = None,
    job_id: Annotated[str | None, Query(max_length=32)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> list[NotificationOut]:
    """Urgent-finding notifications, newest first; ``status=dead`` lists what needs a replay."""
    return [NotificationOut.of(r) for r in _list(session, status, job_id, limit)]


@router.post(
    "/api/notifications/{notification_id}/replay", response_model=NotificationOut, tags=["notifications"]
)
def api_replay_notification(notification_id: int, ctx: Ctx, admin: Admin, client: Client) -> NotificationOut:
    """Send a dead notification again, with a fresh round of retries (admins; audited)."""
    try:
        return NotificationOut.of(_replay(ctx, notification_id, admin, client))
    except actions.ActionError as exc:
        raise HTTPException(status_code=exc.status_code, detail=exc.detail) from exc


@router.get("/notifications", response_class=HTMLResponse)
def notifications_page(
    request: Request, session: DB, user: User, status: Annotated[NotificationStatus | None, Query()] = None
) -> HTMLResponse:
    rows = _list(session, status, None, 500)
    return pages.render(request, "notifications.html", {"rows": rows, "status": status or ""})


@router.post("/notifications/{notification_id}/replay")
def notification_replay(
    request: Request, notification_id: int, ctx: Ctx, admin: Admin, client: Client
) -> Response:
    try:
        row = _replay(ctx, notification_id, admin, client)
        pages.flash(request, "ok", f"Notification {row.id} on {row.channel} queued again.")
    except actions.ActionError as exc:
        pages.flash(request, "error", exc.detail)
    return RedirectResponse("/notifications?status=dead", status_code=303)


class NotificationCollector(Collector):
    """``cxr_notifications{channel,status}`` (rows now) and ``cxr_notification_attempts_total{channel,
    outcome}`` (every attempt ever: a counter, as attempt rows are never deleted)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    def collect(self) -> Iterator[Metric]:
        rows = GaugeMetricFamily(
            "cxr_notifications", "Notifications by channel and status", labels=["channel", "status"]
        )
        tries = CounterMetricFamily(
            "cxr_notification_attempts",
            "Notification attempts by channel and outcome",
            labels=["channel", "outcome"],
        )
        with self.sessions() as session:
            counts = session.execute(
                select(Notification.channel, Notification.status, func.count()).group_by(
                    Notification.channel, Notification.status
                )
            ).all()
            attempts = session.execute(
                select(Notification.channel, NotificationAttempt.outcome, func.count())
                .join(Notification, Notification.id == NotificationAttempt.notification_id)
                .group_by(Notification.channel, NotificationAttempt.outcome)
            ).all()
        by_channel: dict[str, dict[str, int]] = {}
        for channel, status, n in counts:
            by_channel.setdefault(channel, {})[status] = n
        for channel, statuses in sorted(by_channel.items()):
            for status in NotificationStatus:
                rows.add_metric([channel, status.value], float(statuses.get(status.value, 0)))
        for channel, outcome, n in attempts:
            tries.add_metric([channel, outcome], float(n))
        yield rows
        yield tries
