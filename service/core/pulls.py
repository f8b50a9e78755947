"""Pull requests' states and moves in the database (the network half is service.dicomnet.pulls).

queued -> running -> done (moved N) | not_found | failed (a reason). Claims are compare-and-sets, so
listener replicas side by side run each pull once; a running pull whose runner died (its lease passed)
is queued again.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import CursorResult, select, update
from sqlalchemy.orm import Session

from service.core.models import Pull


class PullStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    NOT_FOUND = "not_found"
    FAILED = "failed"


def create(session: Session, requested_by: str, *, study_uid: str | None, accession: str | None) -> Pull:
    """A queued pull (in the caller's transaction); the listener's runner picks it up."""
    pull = Pull(
        requested_by=requested_by[:64],
        study_instance_uid=study_uid,
        accession_number=accession,
        status=PullStatus.QUEUED,
        created_at=datetime.now(UTC),
    )
    session.add(pull)
    session.flush()
    return pull


def claim_next(session: Session, now: datetime, lease: timedelta) -> Pull | None:
    """Take the oldest queued pull (or a running one whose runner is gone) for this runner."""
    candidate = session.scalar(
        select(Pull)
        .where(
            (Pull.status == PullStatus.QUEUED)
            | ((Pull.status == PullStatus.RUNNING) & (Pull.started_at < now - lease))
        )
        .order_by(Pull.id)
        .limit(1)
    )
    if candidate is None:
        return None
    claimed: CursorResult[object] = session.execute(  # type: ignore[assignment]
        update(Pull)
        .where(Pull.id == candidate.id, Pull.status == candidate.status)
        .where(
            Pull.started_at.is_(None)
            if candidate.started_at is None
            else Pull.started_at == candidate.started_at
        )
        .values(status=PullStatus.RUNNING, started_at=now)
    )
    if claimed.rowcount == 0:
        return None  # another replica took it
    session.refresh(candidate)
    return candidate


def finish(
    session: Session,
    pull_id: int,
    status: PullStatus,
    *,
    found: int = 0,
    moved: int = 0,
    failed: int = 0,
    detail: str | None = None,
) -> None:
    session.execute(
        update(Pull)
        .where(Pull.id == pull_id, Pull.status == PullStatus.RUNNING)
        .values(
            status=status,
            studies_found=found,
            instances_moved=moved,
            instances_failed=failed,
            detail=detail,
            finished_at=datetime.now(UTC),
        )
    )
