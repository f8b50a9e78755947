"""Server-rendered pages (Jinja2, autoescaped) with a little plain JavaScript for live updates."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import select

from service.admin import actions, health
from service.admin.api import upload_file
from service.admin.deps import DB, Admin, Client, Ctx, User, job_or_404
from service.admin.guard import client_address, csrf_token, principal_of
from service.admin.queries import JobFilter, filter_choices, job_detail, list_jobs
from service.core.models import Delivery, Job, Study
from service.core.palette import region_colour_hex
from service.core.status import DeliveryStatus, JobStatus
from service.site.jobpage import job_site_context

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))
PAGE_SIZES = (25, 50, 100, 200)
NOTICE = "AI-generated results — not for diagnostic use."

router = APIRouter(include_in_schema=False)


def _dt(value: datetime | None) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S") if value else ""


def _secs(value: float | None) -> str:
    if value is None:
        return ""
    if value < 60:
        return f"{value:.1f} s"
    minutes, seconds = divmod(value, 60)
    return f"{int(minutes)} min {int(seconds)} s"


def _svg_points(polygon: Sequence[Sequence[float]]) -> str:
    """An SVG ``points`` attribute, numbers formatted here (never text from the result)."""
    return " ".join(f"{float(x):.1f},{float(y):.1f}" for x, y in polygon)


def _num(value: float, digits: int = 1) -> str:
    return f"{float(value):.{int(digits)}f}"


def _region_colour(index: int) -> str:
    """Colour of the region at 0-based ``index``: the same as region ``index + 1`` on the heatmap SC."""
    return region_colour_hex(int(index) + 1)


TEMPLATES.env.filters["dt"] = _dt
TEMPLATES.env.filters["secs"] = _secs
TEMPLATES.env.filters["svg_points"] = _svg_points
TEMPLATES.env.filters["num"] = _num
TEMPLATES.env.globals["region_colour"] = _region_colour


def flash(request: Request, kind: str, message: str) -> None:
    request.session.setdefault("flash", [])
    request.session["flash"] = [*request.session["flash"], [kind, message]][-5:]


def render(request: Request, name: str, context: dict[str, Any], status_code: int = 200) -> HTMLResponse:
    ctx = request.app.state.ctx
    flashes = request.session.pop("flash", []) if "flash" in request.session else []
    base = {
        "user": principal_of(request),
        "csrf": csrf_token(request),
        "flashes": flashes,
        "notice": NOTICE,
        "bundle": ctx.bundle_label,
        "path": request.url.path,
        "mode": ctx.settings.mode,
        "live_destinations": [d.ae_title for d in ctx.settings.destinations if d.mode == "live"],
    }
    return TEMPLATES.TemplateResponse(request, name, {**base, **context}, status_code=status_code)


def _back(path: str) -> RedirectResponse:
    return RedirectResponse(path, status_code=303)


def _safe_next(target: str | None) -> str:
    # Only local paths: "//host" or "https://…" would make the login form an open redirect.
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/"


# ---------------------------------------------------------------------------------------------- login


@router.get("/login", response_class=HTMLResponse)
def login_form(request: Request, next: str | None = None) -> Response:
    if principal_of(request) is not None:
        return _back(_safe_next(next))
    return render(request, "login.html", {"next": _safe_next(next), "error": None})


# The form fields' empty defaults are no password (bandit B107).
@router.post("/login", response_class=HTMLResponse)
def login(  # nosec B107
    request: Request,
    ctx: Ctx,
    username: Annotated[str, Form(max_length=64)] = "",
    password: Annotated[str, Form(max_length=1024)] = "",
    next: Annotated[str, Form(max_length=2048)] = "/",
) -> Response:
    address = client_address(request.scope)
    wait = ctx.throttle.retry_after(username, address)
    if wait:
        context = {
            "next": _safe_next(next),
            "error": f"Too many failed attempts. Try again in {int(wait)} s.",
        }
        response = render(request, "login.html", context, status_code=429)
        response.headers["Retry-After"] = str(int(wait + 0.999))
        return response
    role = ctx.accounts.verify(username, password)
    if role is None:
        ctx.throttle.failed(username, address)
        context = {"next": _safe_next(next), "error": "Wrong username or password."}
        return render(request, "login.html", context, status_code=401)
    ctx.throttle.succeeded(username, address)
    # A fresh session (and CSRF token) at login: nothing from before the login carries over.
    request.session.clear()
    request.session["user"] = username
    request.session["csrf"] = secrets.token_urlsafe(32)
    return _back(_safe_next(next))


@router.post("/logout")
def logout(request: Request) -> Response:
    request.session.clear()
    return _back("/login")


# ---------------------------------------------------------------------------------------------- jobs


def _parse_filter(
    status: str, since: str, until: str, source_ae: str, destination: str
) -> tuple[JobFilter, dict[str, str]]:
    """Lenient parsing of the filter form (empty fields mean 'any'); returns the filter and its echo."""

    def day(value: str) -> date | None:
        try:
            return date.fromisoformat(value) if value else None
        except ValueError:
            return None

    st = JobStatus(status) if status in {s.value for s in JobStatus} else None
    flt = JobFilter(st, day(since), day(until), source_ae.strip() or None, destination.strip() or None)
    echo = {
        "status": st.value if st else "",
        "since": flt.since.isoformat() if flt.since else "",
        "until": flt.until.isoformat() if flt.until else "",
        "source_ae": flt.source_ae or "",
        "destination": flt.destination or "",
    }
    return flt, echo


FilterField = Annotated[str, Query(max_length=32)]


@dataclass(frozen=True)
class JobListQuery:
    """The jobs page's filters and paging, shared by the page and the table it polls."""

    status: str
    since: str
    until: str
    source_ae: str
    destination: str
    limit: int
    offset: int


def job_list_query(
    status: FilterField = "",
    since: FilterField = "",
    until: FilterField = "",
    source_ae: FilterField = "",
    destination: FilterField = "",
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> JobListQuery:
    return JobListQuery(status, since, until, source_ae, destination, limit, offset)


JobList = Annotated[JobListQuery, Depends(job_list_query)]


def _jobs_context(request: Request, session: DB, f: JobListQuery) -> dict[str, Any]:
    flt, values = _parse_filter(f.status, f.since, f.until, f.source_ae, f.destination)
    offset = f.offset
    limit = f.limit if f.limit in PAGE_SIZES else 50
    page = list_jobs(session, flt, limit, offset, request.app.state.ctx.settings.viewer_url)
    query = {k: v for k, v in values.items() if v}

    def link(new_offset: int) -> str:
        return "?" + urlencode({**query, "limit": limit, "offset": new_offset})

    return {
        "page": page,
        "values": values,
        "statuses": [s.value for s in JobStatus],
        "limit": limit,
        "page_sizes": PAGE_SIZES,
        "newer": link(max(offset - limit, 0)) if offset > 0 else None,
        "older": link(offset + limit) if offset + limit < page.total else None,
        "rows_url": "/jobs/rows?" + urlencode({**query, "limit": limit, "offset": offset}),
        "page_no": offset // limit + 1,
        "pages": max(1, -(-page.total // limit)),
    }


@router.get("/", response_class=HTMLResponse)
def jobs_page(request: Request, session: DB, user: User, query: JobList) -> HTMLResponse:
    context = _jobs_context(request, session, query)
    sources, destinations = filter_choices(session)
    configured = [d.ae_title for d in request.app.state.ctx.settings.destinations]
    context |= {"sources": sources, "destinations": sorted({*destinations, *configured})}
    return render(request, "jobs.html", context)


@router.get("/jobs/rows", response_class=HTMLResponse)
def jobs_rows(request: Request, session: DB, user: User, query: JobList) -> HTMLResponse:
    """The jobs table body alone, polled by the jobs page."""
    context = _jobs_context(request, session, query)
    return render(request, "_job_rows.html", context)


def _job_context(request: Request, session: DB, job_id: str) -> dict[str, Any]:
    ctx = request.app.state.ctx
    job = job_or_404(session, job_id)
    detail = job_detail(session, job, ctx.settings.output_dir, ctx.settings.viewer_url)
    info = health.bundle_info(ctx.settings.model_bundle)
    points = info.operating_points if info else {}
    later = session.scalars(
        select(Job.id).where(Job.study_id == job.study_id, Job.id != job.id).order_by(Job.created_at)
    ).all()
    user = principal_of(request)
    site = job_site_context(session, job, user.username if user else "")
    return {"job": detail, "operating_points": points, "related": list(later), "patient": None, "site": site}


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(request: Request, job_id: str, session: DB, user: User) -> HTMLResponse:
    return render(request, "job.html", _job_context(request, session, job_id))


@router.get("/jobs/{job_id}/live", response_class=HTMLResponse)
def job_live(request: Request, job_id: str, session: DB, user: User) -> HTMLResponse:
    """Status, timeline and deliveries alone, polled by the job page."""
    return render(request, "_job_live.html", _job_context(request, session, job_id))


@router.post("/jobs/{job_id}/reveal", response_class=HTMLResponse)
def job_reveal(request: Request, job_id: str, session: DB, admin: Admin, client: Client) -> HTMLResponse:
    """The job page with the patient's name and ID shown (admins; audited). POST keeps them out of URLs."""
    context = _job_context(request, session, job_id)
    study = session.scalar(select(Study).join(Job).where(Job.id == job_id))
    assert study is not None
    actions.audit(session, admin, "reveal_patient", target_type="job", target_id=job_id, client=client)
    session.commit()
    context["patient"] = {
        "name": study.patient_name or "",
        "id": study.patient_id or "",
        "accession": study.accession_number or "",
    }
    return render(request, "job.html", context)


@router.post("/jobs/{job_id}/requeue")
def job_requeue(request: Request, job_id: str, ctx: Ctx, admin: Admin, client: Client) -> Response:
    try:
        new_id = actions.requeue(ctx.sessions, ctx.celery, job_id, admin, client)
    except actions.ActionError as exc:
        flash(request, "error", exc.detail)
        return _back(f"/jobs/{job_id}")
    flash(request, "ok", f"Requeued as a new job {new_id[:12]}.")
    return _back(f"/jobs/{new_id}")


@router.post("/jobs/{job_id}/cancel")
def job_cancel(request: Request, job_id: str, ctx: Ctx, admin: Admin, client: Client) -> Response:
    try:
        actions.cancel(ctx.sessions, job_id, admin, client)
        flash(request, "ok", "Job cancelled.")
    except actions.ActionError as exc:
        flash(request, "error", exc.detail)
    return _back(f"/jobs/{job_id}")


# ---------------------------------------------------------------------------------------------- deliveries


@router.get("/dead-letters", response_class=HTMLResponse)
def dead_letters(request: Request, session: DB, user: User) -> HTMLResponse:
    rows = session.scalars(
        select(Delivery)
        .where(Delivery.status.in_([DeliveryStatus.DEAD_LETTER, DeliveryStatus.RETRYING]))
        .order_by(Delivery.id.desc())
        .limit(500)
    ).all()
    dead = [d for d in rows if d.status == DeliveryStatus.DEAD_LETTER]
    retrying = [d for d in rows if d.status == DeliveryStatus.RETRYING]
    return render(request, "dead_letters.html", {"dead": dead, "retrying": retrying})


@router.post("/deliveries/{delivery_id}/replay")
def delivery_replay(
    request: Request,
    delivery_id: int,
    ctx: Ctx,
    admin: Admin,
    client: Client,
    back: Annotated[str, Form(max_length=256)] = "/dead-letters",
) -> Response:
    try:
        delivery = actions.replay(ctx.sessions, ctx.celery, delivery_id, admin, client)
        flash(request, "ok", f"Delivery {delivery.id} to {delivery.ae_title} queued again.")
    except actions.ActionError as exc:
        flash(request, "error", exc.detail)
    return _back(_safe_next(back))


@router.post("/dead-letters/replay-all")
def replay_all(request: Request, session: DB, ctx: Ctx, admin: Admin, client: Client) -> Response:
    ids = actions.dead_letter_ids(session)
    done = 0
    for delivery_id in ids:
        try:
            actions.replay(ctx.sessions, ctx.celery, delivery_id, admin, client)
            done += 1
        except actions.ActionError as exc:
            flash(request, "error", f"delivery {delivery_id}: {exc.detail}")
    flash(request, "ok", f"{done} dead-lettered deliveries queued again.")
    return _back("/dead-letters")


# ---------------------------------------------------------------------------------------------- upload


@router.get("/upload", response_class=HTMLResponse)
def upload_form(request: Request, user: User) -> HTMLResponse:
    max_mb = request.app.state.ctx.settings.dashboard_upload_max_bytes // 1024**2
    return render(request, "upload.html", {"max_mb": max_mb})


@router.post("/upload")
def upload(
    request: Request,
    ctx: Ctx,
    admin: Admin,
    client: Client,
    file: Annotated[UploadFile, File()],
    fresh_uids: Annotated[bool, Form()] = False,
) -> Response:
    try:
        out = upload_file(ctx, file, fresh_uids=fresh_uids, who=admin, client=client)
    except actions.ActionError as exc:
        flash(request, "error", f"Upload failed: {exc.detail}")
        return _back("/upload")
    flash(request, "ok", "Uploaded: the listener stored it, and the job starts once the study is complete.")
    return _back(f"/studies/{out.study_id}" if out.study_id is not None else "/")


@router.get("/studies/{study_id}", response_class=HTMLResponse)
def study_jobs(request: Request, study_id: int, session: DB, user: User) -> Response:
    """The newest job of a study (where an upload lands); a waiting page until the study has one."""
    job_id = session.scalar(
        select(Job.id).where(Job.study_id == study_id).order_by(Job.created_at.desc()).limit(1)
    )
    if job_id is not None:
        return _back(f"/jobs/{job_id}")
    if session.get(Study, study_id) is None:
        raise HTTPException(status_code=404, detail="study not found")
    return render(request, "study_wait.html", {"study_id": study_id})


# ------------------------------------------------------------------------------------- peers, health, audit


@router.get("/peers", response_class=HTMLResponse)
def peers_page(request: Request, ctx: Ctx, user: User) -> HTMLResponse:
    results = request.session.pop("echo", {}) if "echo" in request.session else {}
    return render(request, "peers.html", {"peers": actions.peers(ctx.settings), "echo": results})


@router.post("/peers/echo")
def peers_echo(
    request: Request, ctx: Ctx, admin: Admin, target: Annotated[str, Form(max_length=32)]
) -> Response:
    try:
        result = actions.echo(ctx.settings, target)
    except actions.ActionError as exc:
        flash(request, "error", exc.detail)
        return _back("/peers")
    request.session["echo"] = {target: result.model_dump()}
    return _back("/peers")


@router.get("/health", response_class=HTMLResponse)
def health_page(request: Request, ctx: Ctx, user: User) -> HTMLResponse:
    h = health.health(ctx.settings, ctx.sessions, ctx.celery)
    return render(
        request, "health.html", {"h": h, "lost_after": ctx.settings.reconcile_worker_lost_after_seconds}
    )


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    session: DB,
    user: User,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> HTMLResponse:
    limit = 100
    total, rows = actions.audit_page(session, limit, offset)
    return render(
        request,
        "audit.html",
        {
            "rows": rows,
            "total": total,
            "newer": f"?offset={max(offset - limit, 0)}" if offset > 0 else None,
            "older": f"?offset={offset + limit}" if offset + limit < total else None,
        },
    )
