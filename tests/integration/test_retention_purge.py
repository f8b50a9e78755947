"""`cxr-gateway purge` as an operator runs it, on a real data directory (SQLite database, spool and
outputs on disk): the dry run lists and keeps, the purge removes exactly the settled old study's files."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from service.core.db import make_session_factory, migrate
from service.core.models import StudyPurge
from service.core.settings import load_settings
from service.core.status import DeliveryStatus, JobStatus
from tests.unit.core.test_retention import _study, _study_id


def _purge(data_dir: Path, *args: str) -> str:
    env = {**os.environ, "CXR_DATA_DIR": str(data_dir), "CXR_RETENTION_DAYS": "30"}
    env.pop("CXR_DATABASE_URL", None)
    done = subprocess.run(
        [sys.executable, "-m", "service.cli", "purge", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_purge_command_on_a_real_data_dir(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path, retention_days=30, database_url=None)
    migrate(settings)
    sessions = make_session_factory(settings)
    now = datetime.now(UTC)
    due, due_files = _study(sessions, settings, "due", days_ago=45, now=now)
    _, recent_files = _study(sessions, settings, "recent", days_ago=3, now=now)
    _, undelivered_files = _study(
        sessions, settings, "undelivered", deliveries=[DeliveryStatus.RETRYING], days_ago=45, now=now
    )
    _, running_files = _study(sessions, settings, "running", JobStatus.RUNNING, [], days_ago=45, now=now)

    out = _purge(tmp_path, "--dry-run")
    assert "would purge 1 studies: 4 files, 3000 bytes" in out and "kept 2 not settled" in out
    assert all(p.exists() for p in due_files)

    out = _purge(tmp_path)
    assert "purged 1 studies: 4 files, 3000 bytes" in out
    assert not any(p.exists() for p in due_files)
    assert all(p.exists() for p in recent_files + undelivered_files + running_files)
    with sessions() as s:
        assert s.scalars(select(StudyPurge.study_id)).all() == [_study_id(sessions, due)]
    assert "purged 0 studies" in _purge(tmp_path)
