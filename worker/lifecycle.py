"""A worker process's life around Celery's signals: its heartbeat while it serves, fresh database
connections in each forked pool process, a deadline on a warm stop (past it, running tasks go back to
the broker), and the runtime closed at the end."""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
from typing import Any

from celery.signals import worker_process_init, worker_ready, worker_shutdown, worker_shutting_down

from service.core import task_names as names
from service.core.workers import WorkerInfo
from worker import __version__
from worker.broker import stopping_on_purpose
from worker.heartbeat import Heartbeat
from worker.runtime import Runtime

log = logging.getLogger("worker")


def connect(rt: Runtime) -> None:
    """Attach this process's handlers to Celery's worker signals (once: a second call replaces them)."""
    life = _Lifecycle(rt)
    # weak=False: the handlers are bound methods of an object nothing else keeps.
    worker_ready.connect(life.start_heartbeat, weak=False, dispatch_uid="cxr-heartbeat")
    worker_ready.connect(life.warm_up_in_main, weak=False, dispatch_uid="cxr-warm-main")
    worker_process_init.connect(life.fresh_connections_after_fork, weak=False, dispatch_uid="cxr-fork")
    worker_process_init.connect(life.warm_up, weak=False, dispatch_uid="cxr-warm-child")
    worker_shutting_down.connect(life.hand_back_after_deadline, weak=False, dispatch_uid="cxr-stop")
    worker_shutdown.connect(life.close, weak=False, dispatch_uid="cxr-close")


class _Lifecycle:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.heartbeats: list[Heartbeat] = []

    def start_heartbeat(self, sender: Any = None, **_: Any) -> None:
        """In the main process, once the pool is up: register this worker and keep its row fresh."""
        heartbeat = Heartbeat(
            self.rt.sessions, _worker_info(self.rt, sender), self.rt.settings.worker_heartbeat_seconds
        )
        heartbeat.start()
        self.heartbeats.append(heartbeat)
        # A cold shutdown (hand-back) skips worker_shutdown but still exits normally.
        atexit.register(self.stop_heartbeat)

    def stop_heartbeat(self) -> None:
        # Stopped on purpose (a stop signal): a clean stop, the reconciler must not treat this worker's
        # running jobs as orphaned (a hand-back already returned their messages to the broker). Ended any
        # other way (its broker lost for good): no clean-stop mark, so the row goes silent and the
        # reconciler brings its running jobs back as a lost worker's.
        while self.heartbeats:
            heartbeat = self.heartbeats.pop()
            if heartbeat.info.pid == os.getpid():  # not in a pool child forked after the heartbeat began
                heartbeat.stop(clean=stopping_on_purpose.is_set())

    def warm_up(self, **_: Any) -> None:
        """In each process that runs inference tasks: load the model and start a decoder before the
        first study comes. In a thread: Celery gives a pool process's start-up only seconds."""
        if names.INFERENCE_QUEUE in self.rt.settings.worker_queues:
            threading.Thread(target=self.rt.warm_up, name="warm-up", daemon=True).start()

    def warm_up_in_main(self, **_: Any) -> None:
        # The threads and solo pools run tasks in the main process (prefork's children warm up above).
        if self.rt.settings.worker_pool != "prefork":
            self.warm_up()

    def fresh_connections_after_fork(self, **_: Any) -> None:
        # A prefork child must not share the parent's pooled database connections (the heartbeat's).
        self.rt.sessions.kw["bind"].dispose(close=False)

    def hand_back_after_deadline(self, how: str = "", **_: Any) -> None:
        """SIGTERM starts Celery's warm shutdown, which waits for running tasks however long they take.
        Past ``worker_shutdown_seconds`` turn it into a cold shutdown: the running task's message is not
        acknowledged (late acks), so the broker gives it to another worker before the orchestrator's
        SIGKILL could strand it until the reconciler's deadline."""
        stopping_on_purpose.set()
        if how != "Warm":
            log.info("worker stopping now: running tasks go back to the broker")
            return
        seconds = self.rt.settings.worker_shutdown_seconds
        log.info("worker stopping: waiting up to %g s for running tasks", seconds)
        timer = threading.Timer(seconds, os.kill, args=(os.getpid(), signal.SIGQUIT))
        timer.daemon = True
        timer.start()

    def close(self, **_: Any) -> None:
        # After a warm shutdown's last task: stop the inference thread cleanly.
        self.rt.close()
        self.stop_heartbeat()


def _worker_info(rt: Runtime, sender: Any) -> WorkerInfo:
    """What this worker says about itself in its row (``sender``: Celery's worker, when it has one)."""
    settings = rt.settings
    controller = getattr(sender, "controller", None)
    device = None
    if names.INFERENCE_QUEUE in settings.worker_queues:
        from worker.inference.predictor import resolve_device

        device = str(resolve_device(settings.inference_device))
    return WorkerInfo(
        name=str(getattr(sender, "hostname", None) or f"{os.getpid()}@{os.uname().nodename}"),
        pid=os.getpid(),
        queues=tuple(settings.worker_queues),
        pool=settings.worker_pool,
        concurrency=int(getattr(controller, "concurrency", None) or settings.worker_concurrency),
        device=device,
        version=__version__,
    )
