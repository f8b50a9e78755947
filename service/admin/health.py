"""System health as the dashboard sees it: database, broker, queue depth, workers, disk, model bundle.

Every probe is bounded in time and returns a value or None: the health page must render while the
thing it reports on is down. Nothing here returns URLs, hosts or error texts (they may hold secrets).
"""

from __future__ import annotations

import json
import logging
import shutil
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from celery import Celery
from pydantic import BaseModel
from sqlalchemy import text
from sqlalchemy.orm import Session, sessionmaker

from service.core.queue import QUEUES, broker_kind, queue_depth
from service.core.settings import Settings
from service.core.workers import WorkerView, list_workers

log = logging.getLogger("cxr_gateway.admin")


class DiskOut(BaseModel):
    total_bytes: int
    free_bytes: int
    free_percent: float


class BundleOut(BaseModel):
    name: str | None = None
    version: str | None = None
    description: str | None = None
    intended_use: str | None = None
    labels: list[str] = []
    operating_points: dict[str, float] = {}
    metrics: dict[str, Any] = {}


# Workers silent for longer than this are history, not shown.
WORKER_HISTORY = timedelta(days=1)


class HealthOut(BaseModel):
    database: bool
    broker: bool
    broker_kind: str
    queue_depth: dict[str, int | None]
    workers: list[WorkerView] | None  # from their heartbeats; None: the database could not be asked
    disk: DiskOut | None
    bundle: BundleOut | None


def database_ok(sessions: sessionmaker[Session]) -> bool:
    try:
        with sessions() as session:
            session.execute(text("SELECT 1"))
        return True
    except Exception as exc:
        log.warning("health: database unreachable (%s)", type(exc).__name__)
        return False


def broker_ok(celery: Celery, timeout: float = 2.0) -> bool:
    try:
        with celery.connection_for_read() as conn:
            conn.ensure_connection(max_retries=1, timeout=timeout)
        return True
    except Exception as exc:
        log.warning("health: broker unreachable (%s)", type(exc).__name__)
        return False


def workers(settings: Settings, sessions: sessionmaker[Session]) -> list[WorkerView] | None:
    """Workers seen in the last day, from their heartbeat rows (alive first); None if the database is away."""
    lost_after = timedelta(seconds=settings.reconcile_worker_lost_after_seconds)
    try:
        with sessions() as session:
            return list_workers(session, datetime.now(UTC), lost_after, WORKER_HISTORY)
    except Exception as exc:
        log.warning("health: workers unavailable (%s)", type(exc).__name__)
        return None


def disk(path: Path) -> DiskOut | None:
    try:
        usage = shutil.disk_usage(path)
    except OSError:
        return None
    return DiskOut(
        total_bytes=usage.total,
        free_bytes=usage.free,
        free_percent=round(100.0 * usage.free / usage.total, 1) if usage.total else 0.0,
    )


def bundle_info(bundle_dir: Path) -> BundleOut | None:
    """The bundle's metadata.json as plain JSON (the service never loads the model itself)."""
    try:
        meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict):
        return None
    points = meta.get("operating_points")
    return BundleOut(
        name=_str(meta.get("name")),
        version=_str(meta.get("version")),
        description=_str(meta.get("description")),
        intended_use=_str(meta.get("intended_use")),
        labels=[str(x) for x in meta.get("labels") or []],
        operating_points={str(k): float(v) for k, v in points.items()} if isinstance(points, dict) else {},
        metrics=metrics if isinstance(metrics := meta.get("metrics"), dict) else {},
    )


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


def health(settings: Settings, sessions: sessionmaker[Session], celery: Celery) -> HealthOut:
    broker = broker_ok(celery)
    database = database_ok(sessions)
    return HealthOut(
        database=database,
        broker=broker,
        broker_kind=broker_kind(settings),
        queue_depth=queue_depth(celery, settings) if broker else dict.fromkeys(QUEUES),
        workers=workers(settings, sessions) if database else None,
        disk=disk(settings.data_dir),
        bundle=bundle_info(settings.model_bundle),
    )
