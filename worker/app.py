"""The worker's Celery app: settings come from the environment (and ``CXR_CONFIG``), tasks from tasks.py."""

from __future__ import annotations

import os

from service.core.db import make_session_factory
from service.core.logging import setup_logging
from service.core.queue import make_celery
from service.core.settings import load_settings
from worker.pipeline import Runtime

settings = load_settings(os.environ.get("CXR_CONFIG") or None)
setup_logging(settings.log_level)
runtime = Runtime(settings=settings, sessions=make_session_factory(settings))
app = make_celery(settings)

from worker import tasks  # noqa: E402  (registers the tasks on ``app``)

__all__ = ["app", "runtime", "tasks"]
