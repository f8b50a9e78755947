"""The ``cxr.notify`` task: one attempt of one urgent-finding notification, on the delivery queue.

Thin on purpose: the attempt (claim, build, send, record, next due time) is service.notify.attempt, a
plain function the tests call without Celery. No countdown retry: a failed try records when it is due
again, and the listener's notification scheduler sends the next message then.
"""

from __future__ import annotations

from celery import Celery

from service.notify.attempt import attempt
from service.notify.dispatch import NOTIFY_TASK
from worker.runtime import Runtime


def register_notify_task(app: Celery, rt: Runtime) -> None:
    @app.task(name=NOTIFY_TASK, acks_late=True, shared=False)  # type: ignore[untyped-decorator]
    def notify_task(notification_id: int, attempts: int | None = None) -> None:
        attempt(notification_id, rt.settings, rt.sessions, attempts)
