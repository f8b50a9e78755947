"""Study assembly: a study quiet for the quiet period gets its job queued.

The quiet period counts from the later of the study's last instance and the end of the association
that sent it (``touch``), and does not run at all while an association that sent part of the study is
still open (``busy``): a PACS that pauses between instances of one association is still sending.

A sender that releases its association normally says it has sent what it had (``release``): the study
is queued after the short release grace instead (a next association for it may open meanwhile), unless
an instance arrived after the release. An instance that comes after the job was queued opens a new job
for the study, queued only once the running one has finished: the study runs again once at the end,
over all its instances, never twice at the same time.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Collection
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import exists, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from service.core.db import database_now
from service.core.jobs import transition
from service.core.models import Job, Study
from service.core.queue import send_queued
from service.core.settings import Settings
from service.core.status import JobStatus, ReasonCode
from service.scp.backpressure import BackPressure
from service.scp.safelog import log_failure

log = logging.getLogger(__name__)

# A last-received time further ahead of this host's clock than this was stamped before a clock step back.
CLOCK_STEP_SLACK = timedelta(seconds=60)


def _nothing_busy() -> Collection[int]:
    return ()


class StudyAssembler:
    def __init__(
        self,
        settings: Settings,
        sessions: sessionmaker[Session],
        celery: Celery,
        *,
        pressure: BackPressure | None = None,
        busy: Callable[[], Collection[int]] = _nothing_busy,
    ) -> None:
        self._quiet = timedelta(seconds=settings.study_quiet_seconds)
        self._grace = timedelta(seconds=settings.study_release_grace_seconds)
        self._released: dict[int, datetime] = {}  # study id -> its association's release (in memory)
        self._released_lock = threading.Lock()
        self._wake = threading.Event()
        self._sessions = sessions
        self._celery = celery
        self._pressure = pressure
        self._busy = busy
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval: float = 0.25) -> None:
        self._thread = threading.Thread(target=self._run, args=(interval,), name="assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, interval: float) -> None:
        while True:
            # Sleep the interval, or until the earliest release grace ends (woken by a new release).
            self._wake.wait(self._sleep(interval))
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                self.tick()
            except Exception as exc:
                # Database or broker away: the jobs stay 'received' and the next tick retries.
                log_failure(log, "assembler tick failed", exc)

    def touch(self, study_ids: Collection[int], now: datetime | None = None) -> None:
        """Restart the quiet period of these studies (their association was released or aborted)."""
        if not study_ids:
            return
        now = now or datetime.now(UTC)
        with self._sessions.begin() as session:
            session.execute(
                update(Study)
                .where(Study.id.in_(list(study_ids)), Study.last_received_at < now)
                .values(last_received_at=now)
            )

    def release(self, study_ids: Collection[int], now: datetime | None = None) -> None:
        """These studies' association was released normally: queue them after the release grace."""
        if not study_ids:
            return
        now = now or datetime.now(UTC)
        self.touch(study_ids, now)
        with self._released_lock:
            for study_id in study_ids:
                self._released[study_id] = now
        self._wake.set()

    def _sleep(self, interval: float) -> float:
        with self._released_lock:
            first = min(self._released.values(), default=None)
        if first is None:
            return interval
        due = (first + self._grace - datetime.now(UTC)).total_seconds()
        return min(interval, max(due, 0.0))

    def _released_due(self, now: datetime) -> dict[int, datetime]:
        """Releases whose grace has ended; those older than the quiet period are forgotten (the quiet
        period has ended for them too)."""
        with self._released_lock:
            for study_id, at in list(self._released.items()):
                if at < now - self._quiet - self._grace:
                    del self._released[study_id]
            return {sid: at for sid, at in self._released.items() if at + self._grace <= now}

    def tick(self, now: datetime | None = None) -> list[str]:
        """Queue every received job whose study has been quiet long enough, or released and not sent to
        since; returns their ids."""
        now = now or datetime.now(UTC)
        cutoff = now - self._quiet
        busy = set(self._busy())
        released = self._released_due(now)
        other = aliased(Job)
        # Stamped in the future: this host's clock stepped back since (an NTP correction). Waiting for
        # that time to come round again would hold the study for the size of the step; it has been
        # quiet at least since the step.
        due = (Study.last_received_at <= cutoff) | (Study.last_received_at > now + CLOCK_STEP_SLACK)
        if released:
            due = due | Study.id.in_(list(released))
        with self._sessions() as session:
            rows = session.execute(
                select(Job.id, Job.study_id, Study.last_received_at)
                .join(Study)
                .where(
                    Job.status == JobStatus.RECEIVED,
                    due,
                    # One run of a study at a time: a late instance's job waits for the running one.
                    ~exists().where(
                        other.study_id == Job.study_id,
                        other.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]),
                    ),
                )
                .order_by(Job.created_at)
            ).all()
        ready = [
            (row.id, row.study_id)
            for row in rows
            if row.study_id not in busy
            and self._done_sending(row.study_id, row.last_received_at, cutoff, released)
        ]
        if not ready and self._pressure is not None and not self._pressure.broker_ok:
            self._probe_broker()
        queued: list[str] = []
        for job_id, study_id in ready:
            if self._queue(job_id):
                queued.append(job_id)
                with self._released_lock:
                    self._released.pop(study_id, None)
            elif self._pressure is not None and not self._pressure.broker_ok:
                break  # the broker is away: the rest wait as 'received' for a later tick, not a retry each
        return queued

    @staticmethod
    def _done_sending(
        study_id: int, last_received: datetime, cutoff: datetime, released: dict[int, datetime]
    ) -> bool:
        # Released: ready unless an instance came in after the release (from another association).
        at = released.get(study_id)
        return at is None or last_received <= cutoff or last_received <= at

    def _probe_broker(self) -> None:
        # Stores are refused while the broker is down; with no job to send, ask the broker directly.
        assert self._pressure is not None
        try:
            with self._celery.connection_for_write() as conn:
                conn.ensure_connection(max_retries=1)
        except Exception:
            return
        self._pressure.broker_succeeded()

    def _queue(self, job_id: str) -> bool:
        # The reconciler compares queued_at with the database's clock, so it is stamped by that clock.
        now = database_now(self._sessions)
        # Marked queued conditionally, so two listeners never both take it; then sent.
        with self._sessions.begin() as session:
            if not transition(session, job_id, JobStatus.QUEUED, expected=[JobStatus.RECEIVED], now=now):
                return False
        refused = send_queued(self._sessions, self._celery, job_id)
        if refused is not None:
            log_failure(
                log,
                "broker refused job=%s reason=%s; back to received",
                refused,
                job_id,
                ReasonCode.BROKER_UNAVAILABLE,
            )
            if self._pressure is not None:
                self._pressure.broker_failed()
            return False
        if self._pressure is not None:
            self._pressure.broker_succeeded()
        log.info("queued job=%s", job_id)
        return True
