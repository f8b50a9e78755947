"""The JSON API (OpenAPI at /docs): everything the pages show and do.

Clients authenticate with HTTP Basic (no CSRF token needed) or the browser's login session (writes then
carry ``X-CSRF-Token``). Viewers read; admins also write.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, File, Form, HTTPException, Query, UploadFile
from fastapi.responses import Response
from sqlalchemy import select

from service.admin import actions, health, previews
from service.admin.auth import Principal
from service.admin.deps import DB, Admin, Client, Context, Ctx, User, job_or_404
from service.admin.queries import (
    JobFilter,
    delivery_out,
    heatmap_paths,
    job_detail,
    job_out,
    list_jobs,
    source_image,
)
from service.admin.schemas import (
    AuditOut,
    AuditPage,
    DeliveryOut,
    EchoIn,
    EchoOut,
    JobDetailOut,
    JobOut,
    JobPage,
    Me,
    PatientOut,
    PeerOut,
    RequeueOut,
    UploadOut,
)
from service.core.models import Delivery
from service.core.status import DeliveryStatus, JobStatus

router = APIRouter(prefix="/api")

Limit = Annotated[int, Query(ge=1, le=500)]
Offset = Annotated[int, Query(ge=0)]


T = TypeVar("T")


def _fail(exc: actions.ActionError) -> HTTPException:
    return HTTPException(status_code=exc.status_code, detail=exc.detail)


def _act(action: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a dashboard action; a refusal (ActionError) becomes the HTTP error it names."""
    try:
        return action(*args, **kwargs)
    except actions.ActionError as exc:
        raise _fail(exc) from exc


@router.get("/me", response_model=Me, tags=["session"])
def api_me(user: User) -> Me:
    return Me(username=user.username, role=user.role)


@router.get("/jobs", response_model=JobPage, tags=["jobs"])
def api_jobs(
    session: DB,
    ctx: Ctx,
    status: JobStatus | None = None,
    since: Annotated[date | None, Query(description="received on or after this UTC day")] = None,
    until: Annotated[date | None, Query(description="received on or before this UTC day")] = None,
    source_ae: Annotated[str | None, Query(max_length=16)] = None,
    destination: Annotated[str | None, Query(max_length=16)] = None,
    limit: Limit = 50,
    offset: Offset = 0,
) -> JobPage:
    """Jobs, newest first, with stage times, deliveries and (with CXR_VIEWER_URL) the viewer link."""
    flt = JobFilter(status, since, until, source_ae or None, destination or None)
    return list_jobs(session, flt, limit, offset, ctx.settings.viewer_url)


@router.get("/jobs/{job_id}", response_model=JobDetailOut, tags=["jobs"])
def api_job(job_id: str, session: DB, ctx: Ctx) -> JobDetailOut:
    """One job: timeline events, per-image gate decisions, values and finding regions, image URLs,
    deliveries."""
    job = job_or_404(session, job_id)
    return job_detail(session, job, ctx.settings.output_dir, ctx.settings.viewer_url)


@router.get("/jobs/{job_id}/patient", response_model=PatientOut, tags=["jobs"])
def api_job_patient(job_id: str, session: DB, admin: Admin, client: Client) -> PatientOut:
    """The study's patient name, ID and accession number (admins only; every call is audited)."""
    job = job_or_404(session, job_id)
    actions.audit(session, admin, "reveal_patient", target_type="job", target_id=job_id, client=client)
    session.commit()
    study = job.study
    return PatientOut(
        patient_name=study.patient_name, patient_id=study.patient_id, accession_number=study.accession_number
    )


# A job's picture, served as PNG (documented as such in the OpenAPI schema).
_PNG: dict[str, Any] = {
    "response_class": Response,
    "responses": {200: {"content": {"image/png": {}}}},
    "tags": ["jobs"],
}


@router.get(
    "/jobs/{job_id}/heatmaps/{n}.png",
    **_PNG,
)
def api_heatmap(job_id: str, n: int, session: DB, ctx: Ctx) -> Response:
    """The n-th heatmap Secondary Capture of the job, rendered as PNG."""
    job = job_or_404(session, job_id)
    paths = heatmap_paths(job, ctx.settings.output_dir)
    if not 0 <= n < len(paths) or not paths[n].is_file():
        raise HTTPException(status_code=404, detail="no such heatmap")
    return Response(content=previews.heatmap_png(Path(paths[n])), media_type="image/png")


@router.get(
    "/jobs/{job_id}/images/{n}.png",
    **_PNG,
)
def api_source_image(job_id: str, n: int, session: DB, ctx: Ctx) -> Response:
    """The job's n-th analysed image (``images`` of its result) as a downscaled greyscale PNG (long side
    at most 512 px), read from the spool: the picture the finding regions are drawn on."""
    job = job_or_404(session, job_id)
    found = source_image(session, job, n, ctx.settings.spool_dir)
    if found is None:
        raise HTTPException(status_code=404, detail="no such source image")
    path, entry = found
    try:
        png = previews.source_png(path, invert=entry.get("inverted_by_heuristic") is True)
    except previews.SourceImageError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    return Response(content=png, media_type="image/png")


@router.post("/jobs/{job_id}/requeue", response_model=RequeueOut, tags=["jobs"])
def api_requeue(job_id: str, ctx: Ctx, admin: Admin, client: Client) -> RequeueOut:
    """Run a finished (done, failed, skipped) job's study again as a new job."""
    new_id = _act(actions.requeue, ctx.sessions, ctx.celery, job_id, admin, client)
    return RequeueOut(requeued_from=job_id, job=_job_now(ctx, new_id))


@router.post("/jobs/{job_id}/cancel", response_model=JobOut, tags=["jobs"])
def api_cancel(job_id: str, ctx: Ctx, admin: Admin, client: Client) -> JobOut:
    """Cancel a received or queued job (it ends failed, reason "cancelled")."""
    _act(actions.cancel, ctx.sessions, job_id, admin, client)
    return _job_now(ctx, job_id)


def _job_now(ctx: Context, job_id: str) -> JobOut:
    """The job as it is after an action (read in a fresh session)."""
    with ctx.sessions() as session:
        return job_out(job_or_404(session, job_id), ctx.settings.viewer_url)


@router.get("/deliveries", response_model=list[DeliveryOut], tags=["deliveries"])
def api_deliveries(
    session: DB, status: DeliveryStatus | None = None, limit: Limit = 100
) -> list[DeliveryOut]:
    """Deliveries, newest first; ``status=dead_letter`` lists what needs a replay."""
    stmt = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(Delivery.status == status)
    return [delivery_out(d) for d in session.scalars(stmt)]


@router.post("/deliveries/{delivery_id}/replay", response_model=DeliveryOut, tags=["deliveries"])
def api_replay(delivery_id: int, ctx: Ctx, admin: Admin, client: Client) -> DeliveryOut:
    """Send a dead-lettered (or still retrying) output again."""
    return delivery_out(_act(actions.replay, ctx.sessions, ctx.celery, delivery_id, admin, client))


@router.get("/peers", response_model=list[PeerOut], tags=["peers"])
def api_peers(ctx: Ctx, user: User) -> list[PeerOut]:
    """Our listener, the destinations and the allowed sources, from the settings."""
    return actions.peers(ctx.settings)


@router.post("/peers/echo", response_model=EchoOut, tags=["peers"])
def api_echo(body: EchoIn, ctx: Ctx, admin: Admin) -> EchoOut:
    """C-ECHO the listener or a destination from the dashboard."""
    return _act(actions.echo, ctx.settings, body.target)


@router.get("/health", response_model=health.HealthOut, tags=["health"])
def api_health(ctx: Ctx, user: User) -> health.HealthOut:
    """Database, broker, queue depth, workers online, disk space and the model bundle."""
    return health.health(ctx.settings, ctx.sessions, ctx.celery)


@router.get("/audit", response_model=AuditPage, tags=["audit"])
def api_audit(session: DB, user: User, limit: Limit = 100, offset: Offset = 0) -> AuditPage:
    """Admin actions, newest first."""
    total, rows = actions.audit_page(session, limit, offset)
    return AuditPage(total=total, items=[AuditOut.model_validate(r, from_attributes=True) for r in rows])


@router.post("/upload", response_model=UploadOut, tags=["upload"])
def api_upload(
    ctx: Ctx,
    admin: Admin,
    client: Client,
    file: Annotated[UploadFile, File(description="a DICOM file, or a PNG/JPEG chest image")],
    fresh_uids: Annotated[bool, Form(description="give a DICOM file new study/series/instance UIDs")] = True,
) -> UploadOut:
    """Send a file through the pipeline, C-STOREd to our own listener like a PACS would."""
    return _act(upload_file, ctx, file, fresh_uids=fresh_uids, who=admin, client=client)


def upload_file(
    ctx: Context, file: UploadFile, *, fresh_uids: bool, who: Principal, client: str
) -> UploadOut:
    """The one upload path behind the API and the upload page (size limit, then the action)."""
    data = read_limited(file, ctx.settings.dashboard_upload_max_bytes)
    return actions.upload(
        ctx.sessions, ctx.settings, data, file.filename or "", fresh_uids=fresh_uids, who=who, client=client
    )


def read_limited(file: UploadFile, limit: int) -> bytes:
    data = file.file.read(limit + 1)
    if len(data) > limit:
        raise HTTPException(status_code=413, detail=f"file larger than {limit} bytes")
    if not data:
        raise HTTPException(status_code=422, detail="empty file")
    return data
