"""The admin dashboard: FastAPI app factory, server-rendered pages and a JSON API over the database."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session, selectinload, sessionmaker

from service.core import tasks
from service.core.models import Delivery, Job
from service.core.queue import enqueue, make_celery
from service.core.settings import Settings
from service.core.status import DeliveryStatus, JobStatus

TEMPLATES = Jinja2Templates(directory=str(Path(__file__).parent / "templates"))


class StageTimes(BaseModel):
    received_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    queue_wait_s: float | None
    run_s: float | None
    total_s: float | None


class DeliveryOut(BaseModel):
    id: int
    job_id: str
    ae_title: str
    kind: str
    status: str
    attempts: int
    delivered_at: datetime | None


class JobOut(BaseModel):
    id: str
    status: JobStatus
    reason_code: str | None
    calling_ae_title: str | None
    bundle_version: str | None
    attempts: int
    created_at: datetime
    stages: StageTimes
    deliveries: list[DeliveryOut]


class JobDetailOut(JobOut):
    result: dict[str, Any] | None


class JobPage(BaseModel):
    total: int
    items: list[JobOut]


def _delivery_out(d: Delivery) -> DeliveryOut:
    return DeliveryOut(
        id=d.id,
        job_id=d.job_id,
        ae_title=d.ae_title,
        kind=d.kind,
        status=d.status,
        attempts=d.attempts,
        delivered_at=d.delivered_at,
    )


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


def _job_out(job: Job, detail: bool = False) -> JobOut:
    stages = StageTimes(
        received_at=job.received_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        queue_wait_s=_seconds(job.queued_at, job.started_at),
        run_s=_seconds(job.started_at, job.finished_at),
        total_s=_seconds(job.received_at, job.finished_at),
    )
    fields: dict[str, Any] = {
        "id": job.id,
        "status": JobStatus(job.status),
        "reason_code": job.reason_code,
        "calling_ae_title": job.calling_ae_title,
        "bundle_version": job.bundle_version,
        "attempts": job.attempts,
        "created_at": job.created_at,
        "stages": stages,
        "deliveries": [_delivery_out(d) for d in job.deliveries],
    }
    if detail:
        return JobDetailOut(**fields, result=job.result)
    return JobOut(**fields)


def get_session(request: Request) -> Iterator[Session]:
    sessions: sessionmaker[Session] = request.app.state.sessions
    with sessions() as session:
        yield session


DB = Annotated[Session, Depends(get_session)]


def create_app(settings: Settings, sessions: sessionmaker[Session]) -> FastAPI:
    app = FastAPI(title="cxr-gateway", version="0.1.0")
    app.state.settings = settings
    app.state.sessions = sessions
    celery = make_celery(settings)

    def list_jobs(session: Session, status: JobStatus | None, limit: int, offset: int) -> JobPage:
        stmt = select(Job).options(selectinload(Job.deliveries))
        count = select(func.count()).select_from(Job)
        if status is not None:
            stmt = stmt.where(Job.status == status)
            count = count.where(Job.status == status)
        jobs = session.scalars(stmt.order_by(Job.created_at.desc()).limit(limit).offset(offset)).all()
        return JobPage(total=session.scalar(count) or 0, items=[_job_out(j) for j in jobs])

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/api/jobs", response_model=JobPage, tags=["jobs"])
    def api_jobs(
        session: DB,
        status: JobStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> JobPage:
        return list_jobs(session, status, limit, offset)

    @app.get("/api/jobs/{job_id}", response_model=JobDetailOut, tags=["jobs"])
    def api_job(job_id: str, session: DB) -> JobOut:
        job = session.get(Job, job_id)
        if job is None:
            raise HTTPException(status_code=404, detail="job not found")
        return _job_out(job, detail=True)

    @app.get("/api/deliveries", response_model=list[DeliveryOut], tags=["deliveries"])
    def api_deliveries(
        session: DB,
        status: DeliveryStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 100,
    ) -> list[DeliveryOut]:
        stmt = select(Delivery).order_by(Delivery.id.desc()).limit(limit)
        if status is not None:
            stmt = stmt.where(Delivery.status == status)
        return [_delivery_out(d) for d in session.scalars(stmt)]

    @app.post("/api/deliveries/{delivery_id}/replay", response_model=DeliveryOut, tags=["deliveries"])
    def api_replay(delivery_id: int, session: DB) -> DeliveryOut:
        """Send a dead-lettered (or still retrying) output again."""
        delivery = session.get(Delivery, delivery_id)
        if delivery is None:
            raise HTTPException(status_code=404, detail="delivery not found")
        if delivery.status == DeliveryStatus.DELIVERED:
            raise HTTPException(status_code=409, detail="already delivered")
        delivery.status = DeliveryStatus.PENDING
        delivery.last_error = None
        session.commit()
        enqueue(celery, tasks.DELIVER, delivery_id)
        return _delivery_out(delivery)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def jobs_page(
        request: Request,
        session: DB,
        status: JobStatus | None = None,
        limit: Annotated[int, Query(ge=1, le=500)] = 50,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> HTMLResponse:
        page = list_jobs(session, status, limit, offset)
        return TEMPLATES.TemplateResponse(
            request,
            "jobs.html",
            {"page": page, "status": status, "statuses": list(JobStatus), "limit": limit, "offset": offset},
        )

    return app
