"""Admin actions, shared by the pages and the API; each one writes an audit row in its transaction."""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from typing import Any, Literal

from celery import Celery
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.admin import uploads
from service.admin.auth import Principal
from service.admin.schemas import EchoOut, PeerOut, UploadOut
from service.core import deliveries, jobs, queue
from service.core.models import AuditEntry, Delivery, Job, Study, StudyPurge
from service.core.settings import Settings
from service.core.status import DeliveryStatus, JobStatus
from service.core.tls import client_context
from service.dicomnet import scu

log = logging.getLogger("cxr_gateway.admin")

CANCELLED = "cancelled"
CANCELLABLE = (JobStatus.RECEIVED, JobStatus.QUEUED)


class ActionError(Exception):
    def __init__(self, status_code: int, detail: str) -> None:
        super().__init__(detail)
        self.status_code = status_code
        self.detail = detail


def audit(
    session: Session,
    who: Principal,
    action: str,
    *,
    target_type: str | None = None,
    target_id: str | None = None,
    detail: dict[str, Any] | None = None,
    client: str | None = None,
) -> None:
    session.add(
        AuditEntry(
            username=who.username,
            action=action,
            target_type=target_type,
            target_id=target_id,
            detail=detail,
            client_address=client,
        )
    )
    log.info("audit user=%s action=%s %s=%s", who.username, action, target_type, target_id)


def requeue(
    sessions: sessionmaker[Session], celery: Celery, job_id: str, who: Principal, client: str | None
) -> str:
    """Run a finished job's study again as a NEW job; returns its id.

    A new row rather than resetting the old one: the old job keeps its history and deliveries (whose rows
    are unique per job and output), and the outputs' UIDs derive from the sources, so the PACS gets
    replacements, not duplicates.
    """
    now = datetime.now(UTC)
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ActionError(404, "job not found")
        if not JobStatus(job.status).is_final:
            raise ActionError(409, f"job is {job.status}; only finished jobs can be requeued")
        purge = session.get(StudyPurge, job.study_id)
        study = session.get(Study, job.study_id)
        if purge is not None and study is not None and purge.purged_at >= study.last_received_at:
            # Nothing to analyse: the new job would only fail on missing images in the worker.
            raise ActionError(
                409,
                f"the study's images were purged by retention at {purge.purged_at:%Y-%m-%d %H:%M} UTC "
                "and nothing was received since; send it again from the PACS (or pull it) to analyse it",
            )
        new = jobs.create(session, job.study_id, job.calling_ae_title, now)
        # Queued before it is sent (see queue.send_queued).
        jobs.transition(session, new.id, JobStatus.QUEUED, expected=[JobStatus.RECEIVED], now=now)
        audit(
            session,
            who,
            "requeue",
            target_type="job",
            target_id=job_id,
            detail={"new_job": new.id, "previous_status": job.status},
            client=client,
        )
        new_id = new.id
    refused = queue.send_queued(sessions, celery, new_id)
    if refused is not None:
        raise ActionError(
            503, f"broker unavailable ({type(refused).__name__}); job {new_id} will be queued later"
        ) from refused
    return new_id


def cancel(sessions: sessionmaker[Session], job_id: str, who: Principal, client: str | None) -> None:
    """received/queued → failed ("cancelled"); a worker that later gets the task sees a final job."""
    with sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise ActionError(404, "job not found")
        moved = jobs.transition(
            session,
            job_id,
            JobStatus.FAILED,
            expected=CANCELLABLE,
            reason_code=CANCELLED,
            reason_detail=f"cancelled by {who.username}",
        )
        if not moved:
            raise ActionError(409, f"job is {job.status}; only received or queued jobs can be cancelled")
        audit(session, who, "cancel", target_type="job", target_id=job_id, client=client)


def replay(
    sessions: sessionmaker[Session], celery: Celery, delivery_id: int, who: Principal, client: str | None
) -> Delivery:
    """Send a dead-lettered (or still retrying) output again."""
    with sessions.begin() as session:
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            raise ActionError(404, "delivery not found")
        if delivery.status == DeliveryStatus.DELIVERED:
            raise ActionError(409, "already delivered")
        previous = DeliveryStatus(delivery.status)
        # Due now, its message not out yet: sent below, or by the listener if the broker refuses here.
        moved = deliveries.transition(
            session,
            delivery_id,
            DeliveryStatus.PENDING,
            expected=[previous],
            last_error=None,
            next_attempt_at=datetime.now(UTC),
            dispatched_at=None,
        )
        if not moved:
            raise ActionError(409, "the delivery changed meanwhile; look again")
        session.refresh(delivery)
        audit(
            session,
            who,
            "replay",
            target_type="delivery",
            target_id=str(delivery_id),
            detail={"job": delivery.job_id, "destination": delivery.ae_title, "previous_status": previous},
            client=client,
        )
    if deliveries.send_ids(sessions, celery, [delivery_id], datetime.now(UTC)):
        return delivery
    # Not sent by us, nor meanwhile by the listener's scheduler: the broker refused it. Put it back.
    with sessions.begin() as session:
        refused = deliveries.transition(
            session,
            delivery_id,
            previous,
            expected=[DeliveryStatus.PENDING],
            only_if=Delivery.dispatched_at.is_(None),
            **({"next_attempt_at": None} if previous == DeliveryStatus.DEAD_LETTER else {}),
        )
    if refused:
        raise ActionError(503, "broker unavailable; try again")
    return delivery


def dead_letter_ids(session: Session) -> list[int]:
    return list(
        session.scalars(
            select(Delivery.id).where(Delivery.status == DeliveryStatus.DEAD_LETTER).order_by(Delivery.id)
        )
    )


def audit_page(session: Session, limit: int, offset: int) -> tuple[int, list[AuditEntry]]:
    total = session.scalar(select(func.count()).select_from(AuditEntry)) or 0
    rows = session.scalars(
        select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit).offset(offset)
    ).all()
    return total, list(rows)


def peers(settings: Settings) -> list[PeerOut]:
    me = scu.listener_peer(settings)
    out = [
        PeerOut(
            target="listener", role="listener", ae_title=me.ae_title, host=me.host, port=me.port, tls=me.tls
        )
    ]
    out += [
        PeerOut(
            target=f"destination:{i}",
            role="destination",
            ae_title=d.ae_title,
            host=d.host,
            port=d.port,
            tls=d.tls,
        )
        for i, d in enumerate(settings.destinations)
    ]
    out += [
        PeerOut(target=f"source:{i}", role="source", ae_title=s.ae_title, host=s.host, port=None, tls=False)
        for i, s in enumerate(settings.sources)
    ]
    return out


def echo(settings: Settings, target: str) -> EchoOut:
    """C-ECHO the listener or a destination (sources are callers, not SCPs: nothing to echo)."""
    if target == "listener":
        peer = scu.listener_peer(settings)
    else:
        kind, _, index = target.partition(":")
        if kind != "destination" or not index.isdigit() or int(index) >= len(settings.destinations):
            raise ActionError(404, "no such peer to echo")
        d = settings.destinations[int(index)]
        if d.type == "dicomweb":
            raise ActionError(422, "no C-ECHO to a DICOMweb destination (see its deliveries)")
        peer = scu.Peer(d.ae_title, d.host, d.port, d.tls)
    result = scu.echo(
        peer, calling_ae_title=settings.dashboard_ae_title, tls=lambda: client_context(settings)
    )
    return EchoOut(target=target, ok=result.ok, detail=result.detail, elapsed_ms=result.elapsed_ms)


def upload(
    sessions: sessionmaker[Session],
    settings: Settings,
    data: bytes,
    filename: str,
    *,
    fresh_uids: bool,
    who: Principal,
    client: str | None,
) -> UploadOut:
    """C-STORE the file to our own listener, like a modality would; returns where its study shows up."""
    try:
        ds = uploads.read_upload(data, filename, settings, fresh_uids=fresh_uids)
    except uploads.UploadError as exc:
        raise ActionError(422, str(exc)) from exc
    kind: Literal["dicom", "image"] = (
        "image" if ds.get("StudyDescription") == uploads.UPLOAD_MARK else "dicom"
    )
    try:
        uploads.store_to_listener(settings, ds)
    except uploads.UploadError as exc:
        raise ActionError(502, str(exc)) from exc
    study_uid = str(ds.StudyInstanceUID)
    study_id: int | None = None
    # The listener committed the row before it answered 0x0000, so this normally finds it at once.
    for _ in range(20):
        with sessions() as session:
            study_id = session.scalar(select(Study.id).where(Study.study_instance_uid == study_uid))
        if study_id is not None:
            break
        time.sleep(0.1)
    with sessions.begin() as session:
        audit(
            session,
            who,
            "upload",
            target_type="study",
            target_id=None if study_id is None else str(study_id),
            detail={"kind": kind, "fresh_uids": fresh_uids or kind == "image", "bytes": len(data)},
            client=client,
        )
    return UploadOut(study_id=study_id, kind=kind, detail="stored by the listener; the job starts shortly")
