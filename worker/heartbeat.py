"""The worker's heartbeat: a daemon thread in the worker's main process that keeps its row fresh."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime

from sqlalchemy.orm import Session, sessionmaker

from service.core.workers import WorkerInfo, beat, mark_stopped, register

log = logging.getLogger(__name__)


class Heartbeat:
    """``start`` registers the worker and beats every ``interval`` seconds; ``stop`` marks a clean stop.

    A beat that fails (database away) is logged and retried on the next tick: a worker keeps working
    through a database blip, and the reconciler only acts after several missed beats.
    """

    def __init__(self, sessions: sessionmaker[Session], info: WorkerInfo, interval: float) -> None:
        self._sessions = sessions
        self.info = info
        self._interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._registered = False

    def start(self) -> None:
        self._tick()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._thread.start()
        log.info(
            "worker registered name=%s queues=%s pool=%s concurrency=%d device=%s",
            self.info.name,
            ",".join(self.info.queues),
            self.info.pool,
            self.info.concurrency,
            self.info.device or "-",
        )

    def stop(self, *, clean: bool = True) -> None:
        """Stop beating; ``clean`` (stopped on purpose) also marks the row stopped, otherwise the row is
        left to go silent so the reconciler treats this worker as lost."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if not clean:
            log.warning("worker ending without a stop request name=%s: left to be found lost", self.info.name)
            return
        try:
            with self._sessions.begin() as session:
                mark_stopped(session, self.info.name, datetime.now(UTC))
        except Exception as exc:
            log.warning("worker stop not recorded name=%s (%s)", self.info.name, type(exc).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self._tick()

    def _tick(self) -> None:
        now = datetime.now(UTC)
        try:
            with self._sessions.begin() as session:
                if not (self._registered and beat(session, self.info.name, now)):
                    register(session, self.info, now)
                    self._registered = True
        except Exception as exc:
            log.warning("heartbeat failed name=%s (%s)", self.info.name, type(exc).__name__)
