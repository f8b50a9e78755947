"""Prometheus metrics computed at scrape time from the database (the source of truth) and the broker.

Stage latencies are histograms over every finished job: the collector keeps running totals in memory
and on each scrape reads only jobs finished since the previous one (with an overlap, so a row whose
commit lagged behind its timestamp is still seen once). A restarted dashboard recounts from the start,
which Prometheus treats as a counter reset. No label ever carries patient data.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

from celery import Celery
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.admin import health
from service.admin.notifications import NotificationCollector
from service.core.models import Delivery, Job
from service.core.queue import queue_depth
from service.core.settings import Settings
from service.core.status import DeliveryStatus, JobStatus
from service.core.workers import WorkerState, list_workers
from service.site.drift import DriftCollector

BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
# Images in the forward pass that analysed a job: how well a batching (GPU) worker fills its passes.
BATCH_BUCKETS = (1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0)
STAGES = {
    # stage: (from column, to column)
    "intake": ("received_at", "queued_at"),  # study assembly: quiet period + queueing
    "queue": ("queued_at", "started_at"),  # waiting for a worker
    "run": ("started_at", "finished_at"),  # inference, outputs
    "total": ("received_at", "finished_at"),
}
_OVERLAP = timedelta(seconds=60)


class _Histogram:
    def __init__(self, bounds: tuple[float, ...] = BUCKETS) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)
        self.total = 0.0

    def observe(self, value: float) -> None:
        for i, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[i] += 1
                break
        else:
            self.counts[-1] += 1
        self.total += value

    def buckets(self) -> list[tuple[str, float]]:
        out: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip([*map(str, self.bounds), "+Inf"], self.counts, strict=True):
            running += count
            out.append((bound, running))
        return out


class GatewayCollector(Collector):
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> None:
        self.settings = settings
        self.sessions = sessions
        self.celery = celery
        self._lock = threading.Lock()
        self._hist = {stage: _Histogram() for stage in STAGES}
        self._batch = _Histogram(BATCH_BUCKETS)
        self._cursor: datetime | None = None
        self._seen: dict[str, datetime] = {}  # ids counted within the overlap window

    def _update_stages(self, session: Session) -> None:
        # Only the one number out of each result's JSON (SQLite json_extract, PostgreSQL ->): the first
        # scrape after a restart reads every finished job.
        batch_images = Job.result["inference"]["batch_images"].as_integer().label("batch_images")
        stmt = select(
            Job.id, Job.received_at, Job.queued_at, Job.started_at, Job.finished_at, batch_images
        ).where(Job.finished_at.is_not(None))
        if self._cursor is not None:
            stmt = stmt.where(Job.finished_at > self._cursor - _OVERLAP)
        for row in session.execute(stmt.order_by(Job.finished_at)):
            if row.id in self._seen:
                continue
            self._seen[row.id] = row.finished_at
            for stage, (start, end) in STAGES.items():
                a, b = getattr(row, start), getattr(row, end)
                if a is not None and b is not None:
                    self._hist[stage].observe(max(0.0, (b - a).total_seconds()))
            if row.batch_images is not None and row.batch_images > 0:
                self._batch.observe(float(row.batch_images))
            if self._cursor is None or row.finished_at > self._cursor:
                self._cursor = row.finished_at
        if self._cursor is not None:
            horizon = self._cursor - _OVERLAP
            self._seen = {k: t for k, t in self._seen.items() if t > horizon}

    def collect(self) -> Iterator[Metric]:
        jobs = GaugeMetricFamily("cxr_jobs", "Jobs by status", labels=["status"])
        deliveries = GaugeMetricFamily("cxr_deliveries", "Deliveries by status", labels=["status"])
        with self._lock, self.sessions() as session:
            counts = dict(session.execute(select(Job.status, func.count()).group_by(Job.status)).all())
            for status in JobStatus:
                jobs.add_metric([status.value], float(counts.get(status.value, 0)))
            counts = dict(
                session.execute(select(Delivery.status, func.count()).group_by(Delivery.status)).all()
            )
            for dstatus in DeliveryStatus:
                deliveries.add_metric([dstatus.value], float(counts.get(dstatus.value, 0)))
            self._update_stages(session)
            stages = HistogramMetricFamily(
                "cxr_job_stage_seconds",
                "Job stage latency from the job timestamps (intake, queue, run, total)",
                labels=["stage"],
            )
            for stage, hist in self._hist.items():
                stages.add_metric([stage], hist.buckets(), hist.total)
            batches = HistogramMetricFamily(
                "cxr_inference_batch_images",
                "Images in the forward pass that analysed each job (shared across studies when batching)",
                buckets=self._batch.buckets(),
                sum_value=self._batch.total,
            )
            workers = GaugeMetricFamily(
                "cxr_workers", "Workers by heartbeat state (seen in the last day)", labels=["state"]
            )
            lost_after = timedelta(seconds=self.settings.reconcile_worker_lost_after_seconds)
            views = list_workers(session, datetime.now(UTC), lost_after, health.WORKER_HISTORY)
            for wstate in WorkerState:
                workers.add_metric([wstate.value], float(sum(v.state == wstate for v in views)))
        yield jobs
        yield workers
        yield deliveries
        yield stages
        yield batches
        depth = GaugeMetricFamily("cxr_queue_depth", "Messages waiting in the broker", labels=["queue"])
        for queue, n in queue_depth(self.celery, self.settings).items():
            if n is not None:
                depth.add_metric([queue], float(n))
        yield depth


def make_registry(settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(settings, sessions, celery))
    registry.register(NotificationCollector(sessions))
    registry.register(DriftCollector(settings, sessions))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
