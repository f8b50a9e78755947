"""The database, not the broker, is the source of truth: re-enqueue jobs the broker may have lost.

A job stays 'queued' too long when its message vanished (a broker restarted without persistence, a
purge); it stays 'running' too long when its worker died in a way the broker did not notice. Either way
the reconciler puts it back on the queue. A long backlog is not a loss: a queued job past its deadline
counts as lost only when its message cannot still be in line (see :func:`reconcile`). A running job
whose worker's heartbeat stopped (kill -9, a lost machine) goes back at once, without waiting for the
running deadline. Tasks are idempotent, so a false alarm costs a re-run only.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, sessionmaker

from service.core import tasks
from service.core.jobs import transition
from service.core.models import Delivery, Job, JobEvent
from service.core.queue import enqueue, queue_depth
from service.core.settings import Settings
from service.core.status import DeliveryStatus, JobStatus
from service.core.workers import lost_worker_names, prune

log = logging.getLogger(__name__)

REQUEUED = "requeued_by_reconciler"
WORKER_LOST = "worker_lost"
DELIVERIES_REQUEUED = "deliveries_requeued"
# Listener replicas stamp and send a job's message at slightly different moments.
FIFO_SLACK = timedelta(seconds=30)
# Worker rows (one per worker start) are history after this long.
WORKER_ROWS_KEPT = timedelta(days=7)


def reconcile(
    sessions: sessionmaker[Session],
    celery: Celery,
    *,
    queued_deadline: timedelta,
    running_deadline: timedelta,
    worker_lost_after: timedelta | None = None,
    waiting: int | None = None,
    now: datetime | None = None,
) -> list[str]:
    """Re-enqueue stuck jobs and the running jobs of dead workers; returns their ids.

    ``waiting``: messages in the broker's inference queue (None: unknown). The queue is first in, first
    out, so while messages wait, a job queued past its deadline is only lost when a job queued after it
    (by more than ``FIFO_SLACK``) has already started; otherwise it is still in line behind a backlog,
    and a second message would only double the backlog.
    """
    now = now or datetime.now(UTC)
    with sessions() as session:
        queued = session.execute(
            select(Job.id, Job.queued_at).where(
                Job.status == JobStatus.QUEUED, Job.queued_at < now - queued_deadline
            )
        ).all()
        lost = list(queued)
        if waiting:
            # The newest queueing that a worker has already taken (recent starts only: an indexed range).
            frontier = session.scalar(
                select(func.max(Job.queued_at)).where(
                    Job.started_at >= now - queued_deadline, Job.started_at >= Job.queued_at
                )
            )
            lost = [row for row in queued if frontier and row.queued_at < frontier - FIFO_SLACK]
            if len(lost) < len(queued):
                in_line = len(queued) - len(lost)
                log.info("reconciler: %d queued jobs still in line (%d waiting)", in_line, waiting)
        running = session.execute(
            select(Job.id, Job.started_at).where(
                Job.status == JobStatus.RUNNING, Job.started_at < now - running_deadline
            )
        ).all()
        # Each move is a compare-and-set on what was read here: listener replicas run reconcilers side
        # by side, and only one of them may send the job's second message.
        found: dict[str, tuple[str, JobStatus, ColumnElement[bool]]] = {}
        for job_id, at in lost:
            found[job_id] = (REQUEUED, JobStatus.QUEUED, Job.queued_at == at)
        for job_id, started in running:
            found[job_id] = (REQUEUED, JobStatus.RUNNING, Job.started_at == started)
        if worker_lost_after is not None:
            orphaned = session.execute(
                select(Job.id, Job.worker, Job.started_at).where(
                    Job.status == JobStatus.RUNNING,
                    Job.worker.in_(lost_worker_names(now, worker_lost_after)),
                )
            ).all()
            for job_id, worker, started in orphaned:
                found[job_id] = (
                    WORKER_LOST,
                    JobStatus.RUNNING,
                    (Job.worker == worker) & (Job.started_at == started),
                )
    requeued: list[str] = []
    for job_id, (reason, status, only_if) in found.items():
        with sessions.begin() as session:
            moved = transition(
                session,
                job_id,
                JobStatus.QUEUED,
                expected=[status],
                reason_code=reason,
                now=now,
                only_if=only_if,
            )
        if not moved:
            continue
        try:
            enqueue(celery, tasks.PROCESS_STUDY, job_id)
        except Exception:
            log.exception("reconciler could not reach the broker for job=%s", job_id)
            continue
        log.warning("job=%s re-enqueued reason=%s", job_id, reason)
        requeued.append(job_id)
    requeued.extend(_undelivered(sessions, celery, queued_deadline, now))
    with sessions.begin() as session:
        prune(session, now - WORKER_ROWS_KEPT)
    return requeued


def _undelivered(
    sessions: sessionmaker[Session], celery: Celery, deadline: timedelta, now: datetime
) -> list[str]:
    """Finished jobs whose outputs were never handed to the broker (it was away at the time).

    Re-sending the job's task is enough: for a finished job the worker only enqueues its pending
    deliveries. An event row marks each attempt so a slow queue is not flooded with copies.
    """
    cutoff = now - deadline
    recent = select(JobEvent.job_id).where(JobEvent.reason_code == DELIVERIES_REQUEUED, JobEvent.at >= cutoff)
    with sessions() as session:
        job_ids = session.scalars(
            select(Job.id)
            .join(Delivery, Delivery.job_id == Job.id)
            .where(
                Job.status.in_([JobStatus.DONE, JobStatus.SKIPPED]),
                Job.finished_at < cutoff,
                Delivery.status == DeliveryStatus.PENDING,
                Job.id.not_in(recent),
            )
            .distinct()
        ).all()
    done: list[str] = []
    for job_id in job_ids:
        try:
            enqueue(celery, tasks.PROCESS_STUDY, job_id)
        except Exception:
            log.exception("reconciler could not reach the broker for job=%s", job_id)
            continue
        with sessions.begin() as session:
            session.add(
                JobEvent(job_id=job_id, status=JobStatus.DONE, reason_code=DELIVERIES_REQUEUED, at=now)
            )
        log.warning("job=%s had undelivered outputs; re-enqueued", job_id)
        done.append(job_id)
    return done


class Reconciler:
    """Runs :func:`reconcile` periodically in a daemon thread."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> None:
        self._settings = settings
        self._sessions = sessions
        self._celery = celery
        self._queued = timedelta(seconds=settings.reconcile_queued_after_seconds)
        self._running = timedelta(seconds=settings.reconcile_running_after_seconds)
        self._worker_lost = timedelta(seconds=settings.reconcile_worker_lost_after_seconds)
        self._interval = settings.reconcile_interval_seconds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="reconciler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                reconcile(
                    self._sessions,
                    self._celery,
                    queued_deadline=self._queued,
                    running_deadline=self._running,
                    worker_lost_after=self._worker_lost,
                    waiting=queue_depth(self._celery, self._settings)[tasks.INFERENCE_QUEUE],
                )
            except Exception:
                log.exception("reconciler pass failed")
