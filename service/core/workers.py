"""Worker heartbeats in the database: who is serving, and whose jobs were orphaned by a dead worker.

The broker cannot tell us this: Redis hands an unacknowledged message back only after its visibility
timeout (hours), and Celery's ping collapses workers that share a node name. Each worker's main process
upserts its row every ``worker_heartbeat_seconds``; readers judge liveness by the row's age.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import CursorResult, Select, delete, func, select, update
from sqlalchemy.orm import Session

from service.core.models import Job, Worker
from service.core.status import JobStatus


class WorkerState(enum.StrEnum):
    ALIVE = "alive"
    LOST = "lost"  # no heartbeat for the lost-after period and no clean stop: the process died
    STOPPED = "stopped"


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker says about itself when it starts."""

    name: str
    pid: int
    queues: tuple[str, ...]
    pool: str
    concurrency: int
    device: str | None
    version: str


def register(session: Session, info: WorkerInfo, now: datetime) -> None:
    """Insert or refresh the worker's row (a restarted worker may reuse a node name)."""
    row = session.get(Worker, info.name)
    if row is None:
        row = Worker(name=info.name)
        session.add(row)
    row.pid = info.pid
    row.queues = ",".join(info.queues)
    row.pool = info.pool
    row.concurrency = info.concurrency
    row.device = info.device
    row.version = info.version
    row.started_at = now
    row.last_seen_at = now
    row.stopped_at = None


def beat(session: Session, name: str, now: datetime) -> bool:
    """Refresh the heartbeat; False when the row is gone (pruned), so the caller registers again."""
    stmt = update(Worker).where(Worker.name == name).values(last_seen_at=now, stopped_at=None)
    result: CursorResult[object] = session.execute(stmt)  # type: ignore[assignment]
    return result.rowcount > 0


def mark_stopped(session: Session, name: str, now: datetime) -> None:
    session.execute(update(Worker).where(Worker.name == name).values(last_seen_at=now, stopped_at=now))


def prune(session: Session, before: datetime) -> int:
    """Forget workers last seen before ``before`` (every restart adds a row); returns how many."""
    result: CursorResult[object] = session.execute(delete(Worker).where(Worker.last_seen_at < before))  # type: ignore[assignment]
    return result.rowcount


def state(row: Worker, now: datetime, lost_after: timedelta) -> WorkerState:
    if row.stopped_at is not None:
        return WorkerState.STOPPED
    return WorkerState.ALIVE if row.last_seen_at >= now - lost_after else WorkerState.LOST


def lost_worker_names(now: datetime, lost_after: timedelta) -> Select[str]:
    """A subquery of the names of workers that died: silent past ``lost_after``, never stopped."""
    return select(Worker.name).where(Worker.stopped_at.is_(None), Worker.last_seen_at < now - lost_after)


@dataclass(frozen=True)
class WorkerView(WorkerInfo):
    """A worker as the dashboard shows it: what it said at start, its state now, its running jobs."""

    state: WorkerState
    started_at: datetime
    last_seen_at: datetime
    running_jobs: int


def list_workers(session: Session, now: datetime, lost_after: timedelta, keep: timedelta) -> list[WorkerView]:
    """Workers seen within ``keep`` (older rows are history), alive first, with their running jobs."""
    running = dict(
        session.execute(
            select(Job.worker, func.count())
            .where(Job.status == JobStatus.RUNNING, Job.worker.is_not(None))
            .group_by(Job.worker)
        ).all()
    )
    rows = session.scalars(select(Worker).where(Worker.last_seen_at >= now - keep)).all()
    views = [
        WorkerView(
            name=row.name,
            pid=row.pid,
            state=state(row, now, lost_after),
            queues=tuple(q for q in row.queues.split(",") if q),
            pool=row.pool,
            concurrency=row.concurrency,
            device=row.device,
            version=row.version,
            started_at=row.started_at,
            last_seen_at=row.last_seen_at,
            running_jobs=int(running.get(row.name, 0)),
        )
        for row in rows
    ]
    order = {WorkerState.ALIVE: 0, WorkerState.LOST: 1, WorkerState.STOPPED: 2}
    return sorted(views, key=lambda v: (order[v.state], v.name))
