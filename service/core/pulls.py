"""Pull requests' states and moves in the database (the network half is service.dicomnet.pulls).

    queued ──claim──▶ running ──▶ done (moved N) | not_found | failed (a reason)
                        └──claim (its runner died: the lease passed)──┘ running again

Every move goes through :data:`MACHINE` (service.core.outbox's compare-and-set), so listener replicas
side by side run each pull once; a running pull whose runner died (its lease passed) is claimed again.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import Pull
from service.core.outbox import StateMachine


class PullStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"
    NOT_FOUND = "not_found"
    FAILED = "failed"


FINAL = frozenset({PullStatus.DONE, PullStatus.NOT_FOUND, PullStatus.FAILED})
# The only moves there are: target -> the states it may be reached from. A running pull is claimed
# again (running -> running) only once its lease has passed; a finished one never moves.
ALLOWED_FROM: Mapping[PullStatus, frozenset[PullStatus]] = {
    PullStatus.RUNNING: frozenset({PullStatus.QUEUED, PullStatus.RUNNING}),
    **{final: frozenset({PullStatus.RUNNING}) for final in FINAL},
}
MACHINE = StateMachine(Pull, "pull", ALLOWED_FROM)


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
    # The row as read: another replica's claim changes its status or its start.
    unchanged = (
        Pull.started_at.is_(None) if candidate.started_at is None else Pull.started_at == candidate.started_at
    )
    expected = [PullStatus(candidate.status)]
    if not MACHINE.move(
        session,
        candidate.id,
        PullStatus.RUNNING,
        expected=expected,
        only_if=unchanged,
        values={"started_at": now},
    ):
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
) -> bool:
    """Move a running pull to its final ``status`` with its counts; True if it moved."""
    values = {
        "studies_found": found,
        "instances_moved": moved,
        "instances_failed": failed,
        "detail": detail,
        "finished_at": datetime.now(UTC),
    }
    return MACHINE.move(session, pull_id, status, expected=[PullStatus.RUNNING], values=values)
