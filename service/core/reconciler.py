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
import time
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import ColumnElement, func, select
from sqlalchemy.orm import Session, sessionmaker

from service.core import task_names
from service.core.db import database_now
from service.core.deliveries import resend_lost, send_due
from service.core.jobs import transition
from service.core.models import Job
from service.core.periodic import Periodic
from service.core.queue import queue_depth, send_queued
from service.core.settings import Settings
from service.core.status import JobStatus
from service.core.workers import lost_worker_names, prune

log = logging.getLogger(__name__)

REQUEUED = "requeued_by_reconciler"
WORKER_LOST = "worker_lost"
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
    resend_after: timedelta | None = None,
    delivery_waiting: int | None = None,
) -> list[str]:
    """Re-enqueue stuck jobs and the running jobs of dead workers; returns their ids.

    With ``resend_after`` (the reconcile interval), also send again each open delivery whose message went
    out that long ago without leading to an attempt (see :func:`service.core.deliveries.resend_lost`;
    ``delivery_waiting``: messages in the delivery queue).

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
        refused = send_queued(sessions, celery, job_id)
        if refused is not None:
            log.error("reconciler could not reach the broker for job=%s", job_id, exc_info=refused)
            continue
        log.warning("job=%s re-enqueued reason=%s", job_id, reason)
        requeued.append(job_id)
    if resend_after is not None:
        resend_lost(sessions, celery, now, resend_after, delivery_waiting)
    with sessions.begin() as session:
        prune(session, now - WORKER_ROWS_KEPT)
    return requeued


class Reconciler(Periodic):
    """Runs in a daemon thread of the listener (every replica): sends due deliveries every
    ``delivery_poll_seconds`` and runs :func:`reconcile` every ``reconcile_interval_seconds``.

    Its clock is the database's (PostgreSQL's ``clock_timestamp()``), not this host's: the times it
    compares were written by workers on other hosts, and a step of this host's clock (an NTP correction,
    a VM resumed) must neither hold due deliveries back nor make live workers look dead.
    """

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> None:
        self._settings = settings
        self._sessions = sessions
        self._celery = celery
        self._queued = timedelta(seconds=settings.reconcile_queued_after_seconds)
        self._running = timedelta(seconds=settings.reconcile_running_after_seconds)
        self._worker_lost = timedelta(seconds=settings.reconcile_worker_lost_after_seconds)
        self._interval = settings.reconcile_interval_seconds
        # Intervals by the monotonic clock, which no wall-clock step moves.
        self._next_pass = time.monotonic() + self._interval
        super().__init__("reconciler", min(settings.delivery_poll_seconds, self._interval))

    def tick(self) -> None:
        try:
            send_due(self._sessions, self._celery, database_now(self._sessions))
        except Exception:
            log.exception("delivery scheduler pass failed")
        if time.monotonic() < self._next_pass:
            return
        self._next_pass = time.monotonic() + self._interval
        depth = queue_depth(self._celery, self._settings)
        reconcile(
            self._sessions,
            self._celery,
            queued_deadline=self._queued,
            running_deadline=self._running,
            worker_lost_after=self._worker_lost,
            waiting=depth[task_names.INFERENCE_QUEUE],
            now=database_now(self._sessions),
            resend_after=timedelta(seconds=self._interval),
            delivery_waiting=depth[task_names.DELIVERY_QUEUE],
        )
