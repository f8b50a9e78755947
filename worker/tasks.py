"""Thin Celery tasks: ids in, plain pipeline functions do the work, retry policy here."""

from __future__ import annotations

import logging
from typing import Any

from celery import Task

from service.core import tasks as names
from service.core.queue import enqueue
from service.core.status import JobStatus, ReasonCode
from worker.app import app, runtime
from worker.delivery import deliver, give_up
from worker.errors import TransientError
from worker.pipeline import UNFINISHED, process_study

log = logging.getLogger(__name__)


@app.task(name=names.PROCESS_STUDY, bind=True, max_retries=20, acks_late=True)
def process_study_task(self: Task[Any, Any], job_id: str) -> None:
    try:
        delivery_ids = process_study(job_id, runtime, worker=self.request.hostname)
    except TransientError as exc:
        raise self.retry(exc=exc, countdown=10 * (self.request.retries + 1)) from exc
    except Exception as exc:
        # An unexpected bug fails this job with a code, and the worker takes the next one.
        log.exception("job=%s crashed", job_id)
        from service.core.jobs import transition

        with runtime.sessions.begin() as session:
            transition(
                session,
                job_id,
                JobStatus.FAILED,
                expected=UNFINISHED,
                reason_code=ReasonCode.INTERNAL_ERROR,
                reason_detail=type(exc).__name__,
            )
        return
    try:
        for delivery_id in delivery_ids:
            enqueue(app, names.DELIVER, delivery_id)
    except Exception as exc:
        # Broker away: retry this task; the re-run finds the job done and returns the pending deliveries.
        raise self.retry(exc=exc, countdown=5 * (self.request.retries + 1)) from exc


@app.task(name=names.DELIVER, bind=True, acks_late=True, max_retries=None)
def deliver_task(self: Task[Any, Any], delivery_id: int) -> None:
    settings = runtime.settings
    try:
        deliver(delivery_id, settings, runtime.sessions)
    except TransientError as exc:
        if self.request.retries >= settings.delivery_max_retries:
            give_up(delivery_id, runtime.sessions, str(exc))
            return
        countdown = settings.delivery_retry_base_seconds * (2**self.request.retries)
        raise self.retry(exc=exc, countdown=countdown) from exc
