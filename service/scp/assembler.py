"""Study assembly: a study whose last instance is older than the quiet period gets its job queued."""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime, timedelta

from celery import Celery
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core import tasks
from service.core.jobs import transition
from service.core.models import Job, Study
from service.core.queue import enqueue
from service.core.settings import Settings
from service.core.status import JobStatus

log = logging.getLogger(__name__)


class StudyAssembler:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> None:
        self._quiet = timedelta(seconds=settings.study_quiet_seconds)
        self._sessions = sessions
        self._celery = celery
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, interval: float = 0.25) -> None:
        self._thread = threading.Thread(target=self._run, args=(interval,), name="assembler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.tick()
            except Exception:
                # Database or broker away: the jobs stay 'received' and the next tick retries.
                log.exception("assembler tick failed")

    def tick(self, now: datetime | None = None) -> list[str]:
        """Queue every received job whose study has been quiet long enough; returns their ids."""
        now = now or datetime.now(UTC)
        cutoff = now - self._quiet
        with self._sessions() as session:
            ready = session.scalars(
                select(Job.id)
                .join(Study)
                .where(Job.status == JobStatus.RECEIVED, Study.last_received_at <= cutoff)
                .order_by(Job.created_at)
            ).all()
        queued: list[str] = []
        for job_id in ready:
            if self._queue(job_id):
                queued.append(job_id)
        return queued

    def _queue(self, job_id: str) -> bool:
        now = datetime.now(UTC)
        # Mark queued first (conditionally, so two listeners never both take it), then send: a worker
        # that starts at once must find 'queued', never have its 'running' overwritten.
        with self._sessions.begin() as session:
            if not transition(session, job_id, JobStatus.QUEUED, expected=[JobStatus.RECEIVED], now=now):
                return False
        try:
            enqueue(self._celery, tasks.PROCESS_STUDY, job_id)
        except Exception:
            log.exception("broker refused job=%s; back to received", job_id)
            with self._sessions.begin() as session:
                transition(session, job_id, JobStatus.RECEIVED, expected=[JobStatus.QUEUED])
            return False
        log.info("queued job=%s", job_id)
        return True
