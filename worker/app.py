"""The worker's Celery app: settings come from the environment (and ``CXR_CONFIG``), tasks from tasks.py."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

from celery.signals import worker_shutdown, worker_shutting_down

from service.core.db import make_session_factory
from service.core.logging import setup_logging
from service.core.queue import make_celery
from service.core.settings import load_settings
from worker.pipeline import Runtime

settings = load_settings(os.environ.get("CXR_CONFIG") or None)
setup_logging(settings.log_level)
runtime = Runtime(settings=settings, sessions=make_session_factory(settings))
app = make_celery(settings)


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _hand_back_after_deadline(how: str = "", **_: Any) -> None:
    """SIGTERM starts Celery's warm shutdown, which waits for running tasks however long they take.
    Past ``worker_shutdown_seconds`` turn it into a cold shutdown: the running task's message is not
    acknowledged (late acks), so the broker gives it to another worker before the orchestrator's
    SIGKILL could strand it until the reconciler's deadline."""
    if how != "Warm":
        return
    timer = threading.Timer(settings.worker_shutdown_seconds, os.kill, args=(os.getpid(), signal.SIGQUIT))
    timer.daemon = True
    timer.start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _close_runtime(**_: Any) -> None:
    # After a warm shutdown's last task: stop the inference thread cleanly.
    runtime.close()


from worker import tasks  # noqa: E402  (registers the tasks on ``app``)

__all__ = ["app", "runtime", "tasks"]
