"""The pull state machine: claims and finishes go through its allowed-moves table (SQLite)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.core import pulls
from service.core.db import make_session_factory, migrate
from service.core.models import Pull
from service.core.outbox import ForbiddenTransition
from service.core.pulls import PullStatus
from service.core.settings import load_settings

NOW = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
LEASE = timedelta(minutes=10)


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    settings = load_settings(data_dir=tmp_path)
    migrate(settings)
    return make_session_factory(settings)


def _queued(sessions: sessionmaker[Session]) -> int:
    with sessions.begin() as s:
        return pulls.create(s, "admin", study_uid="1.2.3", accession=None).id


def test_claim_then_finish(sessions: sessionmaker[Session]) -> None:
    pull_id = _queued(sessions)
    with sessions.begin() as s:
        claimed = pulls.claim_next(s, NOW, LEASE)
        assert claimed is not None and (claimed.id, claimed.status) == (pull_id, PullStatus.RUNNING)
        assert pulls.claim_next(s, NOW, LEASE) is None  # running, lease not passed
    with sessions.begin() as s:
        assert pulls.finish(s, pull_id, PullStatus.DONE, found=1, moved=3)
        assert not pulls.finish(s, pull_id, PullStatus.FAILED)  # no longer running
    with sessions.begin() as s:
        row = s.get_one(Pull, pull_id)
        assert (row.status, row.studies_found, row.instances_moved) == (PullStatus.DONE, 1, 3)


def test_lapsed_lease_is_claimed_again(sessions: sessionmaker[Session]) -> None:
    pull_id = _queued(sessions)
    with sessions.begin() as s:
        assert pulls.claim_next(s, NOW, LEASE) is not None
    with sessions.begin() as s:
        again = pulls.claim_next(s, NOW + LEASE + timedelta(seconds=1), LEASE)
        assert again is not None and again.id == pull_id


def test_forbidden_moves_raise(sessions: sessionmaker[Session]) -> None:
    pull_id = _queued(sessions)
    with sessions.begin() as s:
        with pytest.raises(ForbiddenTransition, match="pull may not move running -> queued"):
            pulls.finish(s, pull_id, PullStatus.QUEUED)
        with pytest.raises(ForbiddenTransition, match="pull may not move done -> failed"):
            pulls.MACHINE.move(s, pull_id, PullStatus.FAILED, expected=[PullStatus.DONE])
        assert not pulls.MACHINE.allowed(PullStatus.QUEUED, PullStatus.DONE)
    with sessions.begin() as s:
        assert s.get_one(Pull, pull_id).status == PullStatus.QUEUED
