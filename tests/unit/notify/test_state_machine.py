"""The notification state machine: exactly the allowed moves happen, each one a compare-and-set."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import pytest
from sqlalchemy.orm import Session, sessionmaker

from service.core.models import Notification
from service.core.notifications import (
    ALLOWED_FROM,
    NotificationStatus,
    TransitionNotAllowed,
    allowed,
    transition,
)
from service.notify.rules import create_for_job
from tests.unit.notify.conftest import FINISHED, database, done_job, make_settings

S = NotificationStatus


def test_the_table_is_the_documented_machine() -> None:
    moves = {(src, dst) for dst, srcs in ALLOWED_FROM.items() for src in srcs}
    assert moves == {
        (S.PENDING, S.SENDING),
        (S.FAILED_RETRYING, S.SENDING),
        (S.SENDING, S.SENT),
        (S.SENDING, S.FAILED_RETRYING),
        (S.SENDING, S.DEAD),
        (S.DEAD, S.PENDING),
    }
    # Nothing leaves "sent"; nothing but a claim leads to "sending".
    assert not any(allowed(S.SENT, dst) for dst in S)


@pytest.fixture
def notification(tmp_path: Path) -> tuple[sessionmaker[Session], int]:
    """A migrated database with one notification row of a finished job: the sessions and its id."""
    settings = make_settings(tmp_path)
    sessions = database(settings)
    job_id = done_job(sessions)
    with sessions.begin() as s:
        [row_id, *_] = create_for_job(s, job_id, settings, FINISHED)
    return sessions, row_id


def test_every_pair_moves_only_when_allowed(notification: tuple[sessionmaker[Session], int]) -> None:
    sessions, row_id = notification
    for src, dst in product(S, S):
        with sessions.begin() as s:
            s.get(Notification, row_id).status = src  # type: ignore[union-attr]
        with sessions.begin() as s:
            if allowed(src, dst):
                assert transition(s, row_id, dst), (src, dst)
            else:
                # Asked for explicitly: a caller bug, refused loudly; by default: simply no move.
                with pytest.raises(TransitionNotAllowed):
                    transition(s, row_id, dst, expected=[src])
                assert not transition(s, row_id, dst)
        with sessions() as s:
            status = s.get(Notification, row_id).status  # type: ignore[union-attr]
        assert status == (dst if allowed(src, dst) else src), (src, dst)


def test_a_claim_is_a_compare_and_set_on_the_attempt_count(
    notification: tuple[sessionmaker[Session], int],
) -> None:
    sessions, row_id = notification
    with sessions.begin() as s:
        assert transition(s, row_id, S.SENDING, if_attempts=0, attempts=1)
    with sessions.begin() as s:
        # A second message for attempt 1 (a doubled message, another replica) finds nothing to do.
        assert not transition(s, row_id, S.SENDING, if_attempts=0, attempts=1)
        assert not transition(s, row_id, S.SENT, if_attempts=0)
        assert transition(s, row_id, S.SENT, if_attempts=1)
    with sessions() as s:
        row = s.get(Notification, row_id)
        assert row is not None
        assert (row.status, row.attempts, row.next_attempt_at) == (S.SENT, 1, None)
        assert row.sent_at is not None
