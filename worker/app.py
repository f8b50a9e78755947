"""The worker's Celery app: settings come from the environment (and ``CXR_CONFIG``), tasks from tasks.py."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from typing import Any

from celery.apps import worker as celery_worker
from celery.signals import worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from service.core import tasks as names
from service.core.db import make_session_factory
from service.core.logging import setup_logging
from service.core.queue import make_celery
from service.core.settings import load_settings
from service.core.workers import WorkerInfo
from worker import __version__
from worker.broker import guard_restore_unacked, stopping_on_purpose
from worker.confine import confine_to_data_dir
from worker.heartbeat import Heartbeat
from worker.pipeline import Runtime

settings = load_settings(os.environ.get("CXR_CONFIG") or None)
confine_to_data_dir(settings)  # before the inference libraries are imported: they read it then
setup_logging(settings.log_level)
runtime = Runtime(settings=settings, sessions=make_session_factory(settings))
app = make_celery(settings)
guard_restore_unacked()
log = logging.getLogger("worker")


class _Worker(celery_worker.Worker):  # type: ignore[misc]
    """Celery's worker program without its "worker: Warm/Cold shutdown (MainProcess)" prints on SIGTERM,
    Ctrl-C and SIGQUIT: ``_hand_back_after_deadline`` logs the gateway's own line instead."""

    def install_platform_tweaks(self, worker: Any) -> None:
        super().install_platform_tweaks(worker)
        celery_worker.install_worker_term_handler(worker, verbose=False)
        celery_worker.install_worker_int_handler(worker, verbose=False)
        celery_worker.install_worker_term_hard_handler(worker, verbose=False)


app.Worker = app.subclass_with_self(_Worker)


_heartbeat: list[Heartbeat] = []


@worker_ready.connect  # type: ignore[untyped-decorator]
def _start_heartbeat(sender: Any = None, **_: Any) -> None:
    """In the main process, once the pool is up: register this worker and keep its row fresh."""
    controller = getattr(sender, "controller", None)
    device = None
    if names.INFERENCE_QUEUE in settings.worker_queues:
        from worker.inference.predictor import resolve_device

        device = str(resolve_device(settings.inference_device))
    info = WorkerInfo(
        name=str(getattr(sender, "hostname", None) or f"{os.getpid()}@{os.uname().nodename}"),
        pid=os.getpid(),
        queues=tuple(settings.worker_queues),
        pool=settings.worker_pool,
        concurrency=int(getattr(controller, "concurrency", None) or settings.worker_concurrency),
        device=device,
        version=__version__,
    )
    heartbeat = Heartbeat(runtime.sessions, info, settings.worker_heartbeat_seconds)
    heartbeat.start()
    _heartbeat.append(heartbeat)
    # A cold shutdown (hand-back) skips worker_shutdown but still exits normally.
    atexit.register(_stop_heartbeat)


def _stop_heartbeat(**_: Any) -> None:
    # Stopped on purpose (a stop signal): a clean stop, the reconciler must not treat this worker's
    # running jobs as orphaned (a hand-back already returned their messages to the broker). Ended any
    # other way (its broker lost for good): no clean-stop mark, so the row goes silent and the
    # reconciler brings its running jobs back as a lost worker's.
    while _heartbeat:
        heartbeat = _heartbeat.pop()
        if heartbeat.info.pid == os.getpid():  # not in a pool child forked after the heartbeat began
            heartbeat.stop(clean=stopping_on_purpose.is_set())


@worker_process_init.connect  # type: ignore[untyped-decorator]
def _fresh_connections_after_fork(**_: Any) -> None:
    # A prefork child must not share the parent's pooled database connections (the heartbeat's).
    runtime.sessions.kw["bind"].dispose(close=False)


@worker_shutting_down.connect  # type: ignore[untyped-decorator]
def _hand_back_after_deadline(how: str = "", **_: Any) -> None:
    """SIGTERM starts Celery's warm shutdown, which waits for running tasks however long they take.
    Past ``worker_shutdown_seconds`` turn it into a cold shutdown: the running task's message is not
    acknowledged (late acks), so the broker gives it to another worker before the orchestrator's
    SIGKILL could strand it until the reconciler's deadline."""
    stopping_on_purpose.set()
    if how != "Warm":
        log.info("worker stopping now: running tasks go back to the broker")
        return
    log.info("worker stopping: waiting up to %g s for running tasks", settings.worker_shutdown_seconds)
    timer = threading.Timer(settings.worker_shutdown_seconds, os.kill, args=(os.getpid(), signal.SIGQUIT))
    timer.daemon = True
    timer.start()


@worker_shutdown.connect  # type: ignore[untyped-decorator]
def _close_runtime(**_: Any) -> None:
    # After a warm shutdown's last task: stop the inference thread cleanly.
    runtime.close()
    _stop_heartbeat()


from worker import tasks  # noqa: E402  (registers the tasks on ``app``)

__all__ = ["app", "runtime", "tasks"]
