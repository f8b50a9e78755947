"""When the listener should answer 0xA700 (out of resources) so the PACS keeps the instance and retries.

Every check is cheap enough for each C-STORE (one ``statvfs``, one flag); nothing here blocks.
"""

from __future__ import annotations

import logging
import threading

from service.core.settings import Settings
from service.core.status import ReasonCode
from service.scp import spool

log = logging.getLogger(__name__)


class BackPressure:
    def __init__(self, settings: Settings) -> None:
        self._spool_dir = settings.spool_dir
        # Public so an operator's tooling (and tests) can move the watermark at run time.
        self.min_free_bytes = settings.spool_min_free_bytes
        self.min_free_percent = settings.spool_min_free_percent
        self._lock = threading.Lock()
        self._broker_ok = True

    @property
    def broker_ok(self) -> bool:
        return self._broker_ok

    def broker_failed(self) -> None:
        with self._lock:
            if self._broker_ok:
                log.warning(
                    "broker unreachable: C-STOREs still stored durably, their jobs queued once it is back "
                    "reason=%s",
                    ReasonCode.BROKER_UNAVAILABLE,
                )
            self._broker_ok = False

    def broker_succeeded(self) -> None:
        with self._lock:
            if not self._broker_ok:
                log.info("broker reachable again: queueing the jobs that waited")
            self._broker_ok = True

    def refusal(self, incoming_bytes: int = 0) -> ReasonCode | None:
        """A reason to refuse the next instance of ``incoming_bytes``, or None to accept it.

        A broker outage is no reason: the 0x0000 promises a durable spool file and database rows, not a
        queued message. The jobs wait as 'received' in the database and the assembler queues them once
        the broker is back; the disk watermark bounds what piles up meanwhile.
        """
        try:
            free, percent = spool.free_space(self._spool_dir)
        except OSError:
            return ReasonCode.SPOOL_WRITE_FAILED
        if free - incoming_bytes < self.min_free_bytes or percent < self.min_free_percent:
            return ReasonCode.SPOOL_DISK_LOW
        return None
