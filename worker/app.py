"""The worker's Celery app, made at start-up (``python -m worker``) over the runtime built there: the
shared Celery configuration, Celery's worker program without its shutdown prints, this worker's tasks."""

from __future__ import annotations

from typing import Any

from celery import Celery
from celery.apps import worker as celery_worker

from service.core.queue import make_celery
from worker.notify_task import register_notify_task
from worker.runtime import Runtime
from worker.tasks import register_tasks


class _QuietWorker(celery_worker.Worker):  # type: ignore[misc]
    """Celery's worker program without its "worker: Warm/Cold shutdown (MainProcess)" prints on SIGTERM,
    Ctrl-C and SIGQUIT: worker.lifecycle logs the gateway's own line instead."""

    def install_platform_tweaks(self, worker: Any) -> None:
        super().install_platform_tweaks(worker)
        celery_worker.install_worker_term_handler(worker, verbose=False)
        celery_worker.install_worker_int_handler(worker, verbose=False)
        celery_worker.install_worker_term_hard_handler(worker, verbose=False)


def make_app(rt: Runtime) -> Celery:
    app = make_celery(rt.settings)
    app.Worker = app.subclass_with_self(_QuietWorker)
    register_tasks(app, rt)
    register_notify_task(app, rt)  # urgent-finding notifications (service.notify)
    return app
