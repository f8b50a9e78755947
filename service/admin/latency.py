"""How long studies took, stage by stage: from the association's release to the results delivered.

Read from the job and delivery rows the gateway writes anyway (no extra bookkeeping on the hot path). The
dashboard shows the last hour (page and API); ``bench/latency_bench.py`` prints the same stages for its run.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse
from pydantic import BaseModel
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.admin import pages
from service.admin.deps import DB, User
from service.core.models import Delivery, Instance, Job, Study
from service.core.status import DeliveryStatus, JobStatus

# Stage name -> what it spans; "released": the association's release (the study's last receipt before
# the job was queued).
STAGES: dict[str, str] = {
    "quiet": "released -> queued (study-complete rule)",
    "broker": "queued -> running (hand-over to a worker)",
    "analysis": "running -> done (decode, model, outputs)",
    "delivery": "done -> last output delivered",
    "end_to_end": "released -> last output delivered",
}
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class JobTimes:
    job_id: str
    released_at: datetime
    queued_at: datetime
    started_at: datetime
    finished_at: datetime
    delivered_at: datetime | None  # None: no delivery, or one not delivered (yet)

    def stages(self) -> dict[str, float]:
        spans = {
            "quiet": (self.released_at, self.queued_at),
            "broker": (self.queued_at, self.started_at),
            "analysis": (self.started_at, self.finished_at),
            "delivery": (self.finished_at, self.delivered_at),
            "end_to_end": (self.released_at, self.delivered_at),
        }
        return {name: (b - a).total_seconds() for name, (a, b) in spans.items() if b is not None}


class StageSummary(BaseModel):
    stage: str
    span: str
    count: int
    p50: float | None
    p95: float | None
    p99: float | None


class LatencyOut(BaseModel):
    """Seconds per stage of the done jobs finished in the window (a job counts in ``delivery`` and
    ``end_to_end`` once every output of it is delivered)."""

    window_seconds: int
    stages: list[StageSummary]


def job_times(session: Session, since: datetime) -> list[JobTimes]:
    """Done jobs finished since ``since``, oldest first."""
    # The last receipt this job's run saw: a late instance moves the study's time on, for the next run.
    last_instance = (
        select(func.max(Instance.received_at))
        .where(Instance.study_id == Job.study_id, Instance.received_at <= Job.queued_at)
        .scalar_subquery()
    )
    delivered = (
        select(Delivery.job_id, func.max(Delivery.delivered_at).label("last"), func.count().label("n"))
        .group_by(Delivery.job_id)
        .subquery()
    )
    undelivered = (
        select(Delivery.job_id, func.count().label("open"))
        .where(Delivery.status != DeliveryStatus.DELIVERED)
        .group_by(Delivery.job_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Job.id,
            Study.last_received_at,
            last_instance,
            Job.queued_at,
            Job.started_at,
            Job.finished_at,
            delivered.c.last,
            undelivered.c.open,
        )
        .join(Study, Study.id == Job.study_id)
        .outerjoin(delivered, delivered.c.job_id == Job.id)
        .outerjoin(undelivered, undelivered.c.job_id == Job.id)
        .where(Job.status == JobStatus.DONE, Job.finished_at >= since)
        .order_by(Job.finished_at)
    ).all()
    out: list[JobTimes] = []
    for job_id, study_last, instance_last, queued, started, finished, last_delivered, still_open in rows:
        if queued is None or started is None or finished is None:
            continue
        released = study_last if study_last <= queued else (instance_last or queued)
        out.append(
            JobTimes(job_id, released, queued, started, finished, None if still_open else last_delivered)
        )
    return out


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None without values."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return cuts[int(q) - 1] if q < 100 else max(values)


def summarise(seconds_by_stage: dict[str, list[float]]) -> list[StageSummary]:
    out = []
    for stage in STAGES:
        values = seconds_by_stage.get(stage, [])
        p50, p95, p99 = (_rounded(percentile(values, q)) for q in PERCENTILES)
        out.append(
            StageSummary(stage=stage, span=STAGES[stage], count=len(values), p50=p50, p95=p95, p99=p99)
        )
    return out


def stage_seconds(times: list[JobTimes]) -> dict[str, list[float]]:
    by_stage: dict[str, list[float]] = {stage: [] for stage in STAGES}
    for t in times:
        for stage, seconds in t.stages().items():
            by_stage[stage].append(seconds)
    return by_stage


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


WINDOW = timedelta(hours=1)
router = APIRouter()


def last_hour(session: Session, now: datetime) -> LatencyOut:
    stages = summarise(stage_seconds(job_times(session, now - WINDOW)))
    return LatencyOut(window_seconds=int(WINDOW.total_seconds()), stages=stages)


@router.get("/api/latency", response_model=LatencyOut, tags=["health"])
def api_latency(session: DB, user: User) -> LatencyOut:
    """p50/p95/p99 seconds per stage, from the association's release to the results delivered, over
    the last hour's done jobs."""
    return last_hour(session, datetime.now(UTC))


@router.get("/latency", response_class=HTMLResponse)
def latency_page(request: Request, session: DB, user: User) -> HTMLResponse:
    return pages.render(request, "latency.html", {"latency": last_hour(session, datetime.now(UTC))})
