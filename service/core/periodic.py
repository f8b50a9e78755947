"""A daemon thread that runs one pass every few seconds until stopped: the listener's reconciler and its
notification scheduler. A pass that fails is logged, and the next one runs (the database or the broker
may be back by then)."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger(__name__)


class Periodic:
    """Calls :meth:`tick` every ``every`` seconds in a daemon thread named ``name``."""

    def __init__(self, name: str, every: float) -> None:
        self._name = name
        self._every = every
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def tick(self) -> None:
        raise NotImplementedError

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self._every):
            try:
                self.tick()
            except Exception:
                log.exception("%s pass failed", self._name)
