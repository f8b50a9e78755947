"""Thin Celery tasks: ids in, plain functions do the work; the retry policy for a database that is away
lives here. Registered on the app the worker builds at start-up, over the runtime it built."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from concurrent.futures import Future
from typing import Any

from celery import Celery, Task
from sqlalchemy import select
from sqlalchemy.exc import InterfaceError, OperationalError

from service.core import task_names as names
from service.core.models import Job
from service.core.queue import enqueue
from service.core.status import DeliveryStatus, ReasonCode
from worker.claim import fail_job
from worker.delivery import Claim, attempt_together, claim, deliver, wait_for_database
from worker.pipeline import process_study
from worker.runtime import Runtime

log = logging.getLogger(__name__)


# The database restarting or out of reach: the job is not at fault, run it again once it answers.
DATABASE_AWAY = (OperationalError, InterfaceError)
DATABASE_WAIT_SECONDS = 60.0
# Runs of one job after which a database error is the job's own (a statement that always fails).
MAX_RUNS = 5


def register_tasks(app: Celery, rt: Runtime) -> None:
    # shared=False: Celery's default also registers each task on every Celery app created later in this
    # process, bound to this runtime; such an app could then run its tasks on another database.
    @app.task(name=names.PROCESS_STUDY, bind=True, acks_late=True, shared=False)
    def process_study_task(self: Task[Any, Any], job_id: str) -> None:
        run_study(self.app, rt, job_id, worker=self.request.hostname)

    @app.task(name=names.DELIVER, acks_late=True, shared=False)
    def deliver_task(delivery_id: int, attempt: int | None = None) -> str | None:
        # One attempt; a failure records when the delivery is due again (no countdown task on the broker).
        status = deliver(delivery_id, rt.settings, rt.sessions, attempt)
        return None if status is None else str(status)


def send_on_lanes(rt: Runtime, ids: Iterable[int]) -> list[Future[list[DeliveryStatus] | None]]:
    """Claim each delivery's next attempt here and make them on their destination's own thread (its
    lane), a destination's outputs together (one association): the task returns at once, so a slow or
    refusing destination holds up neither the next study nor another destination. A claimed attempt
    that never ends (this process died) is due again when its lease runs out, and the listener sends it.
    """
    by_target: dict[tuple[str, str, int], list[tuple[int, Claim]]] = {}
    for delivery_id in ids:
        claimed = claim(delivery_id, rt.sessions)
        if claimed is not None:
            by_target.setdefault(claimed[2], []).append((delivery_id, claimed))
    return [rt.lane(target).submit(_attempt, rt, claims) for target, claims in by_target.items()]


def _attempt(rt: Runtime, claims: list[tuple[int, Claim]]) -> list[DeliveryStatus] | None:
    try:
        return attempt_together(claims, rt.settings, rt.sessions)
    except Exception:  # nobody waits on the lane's future: say it here
        ids = [delivery_id for delivery_id, _ in claims]
        log.exception("deliveries=%s attempt crashed; due again when their lease ends", ids)
        return None


def run_study(app: Celery, rt: Runtime, job_id: str, worker: str | None) -> None:
    """The process-study task: the job, then its deliveries sent. A crash fails the job; a stop hands it
    back to the broker; a database that is away is waited for."""
    try:
        delivery_ids = process_study(job_id, rt, worker=worker)
    except DATABASE_AWAY as exc:
        _rerun_after_database(app, rt, job_id, exc)
        return
    except Exception as exc:
        stop = _stop_inside(exc)
        if stop is not None:
            # The pool process was told to stop (a cold shutdown's hand-back) while a library wrapped the
            # SystemExit (monai's network lookup turns it into pydoc's ErrorDuringImport): not the job's
            # fault, so no 'failed'. The unacknowledged message goes back to the broker for another worker.
            log.warning("job=%s interrupted by a stop; handed back", job_id)
            raise stop from exc
        # An unexpected bug fails this job with a code, and the worker takes the next one.
        log.exception("job=%s crashed", job_id)
        fail_job(rt.sessions, job_id, ReasonCode.INTERNAL_ERROR, type(exc).__name__)
        return
    # The first attempts straight from here, no broker hop; whatever cannot be claimed here (database
    # away) stays due, and the listener's scheduler sends it once it can.
    try:
        send_on_lanes(rt, delivery_ids)
    except DATABASE_AWAY as exc:
        log.warning("job=%s deliveries left to the listener (database away: %s)", job_id, type(exc).__name__)


def _rerun_after_database(app: Celery, rt: Runtime, job_id: str, exc: Exception) -> None:
    """Wait here (this worker holds the message, unacknowledged) until the database answers, then send the
    job's task again to run now: not Celery's retry, whose default is a 3-minute countdown task. Still away
    after the wait: the job stays 'running' under this live worker, and the reconciler's running deadline
    brings it back."""
    log.warning("job=%s database away (%s); waiting for it", job_id, type(exc).__name__)
    if not wait_for_database(rt.sessions, DATABASE_WAIT_SECONDS):
        raise exc
    with rt.sessions() as session:
        runs = session.scalar(select(Job.attempts).where(Job.id == job_id)) or 0
    if runs < MAX_RUNS:
        enqueue(app, names.PROCESS_STUDY, job_id)
        return
    log.error("job=%s failed on the database %d times; giving up", job_id, runs)
    fail_job(rt.sessions, job_id, ReasonCode.INTERNAL_ERROR, type(exc).__name__)


def _stop_inside(exc: BaseException) -> BaseException | None:
    """A SystemExit or KeyboardInterrupt among the exceptions that led to ``exc``, if any."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, (SystemExit, KeyboardInterrupt)):
            return current
        current = current.__cause__ or current.__context__
    return None
