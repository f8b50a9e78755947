"""Study assembly on the real path: the quiet period, association release, and late instances re-running."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from service.core.jobs import transition
from service.core.models import JobEvent, Study
from service.core.status import JobStatus
from service.listener_main import Listener
from tests.support.dcmtk import storescu
from tests.support.ingest import (
    association,
    ingest_settings,
    jobs,
    running_listener,
    scu,
    store_status,
    wait_for,
)

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"
QUIET = 0.6


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    with running_listener(ingest_settings(tmp_path, study_quiet_seconds=QUIET)) as lst:
        yield lst


def _instance(shared_dir: Path, study_uid: str) -> Dataset:
    ds = dcmread(shared_dir / CR)
    ds.StudyInstanceUID = study_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def _broker_messages(listener: Listener) -> int:
    return len(list((listener.settings.broker_dir / "messages").glob("*.msg")))


def _study(listener: Listener, study_uid: str) -> Study:
    with listener.sessions() as session:
        return session.scalars(select(Study).where(Study.study_instance_uid == study_uid)).one()


def _statuses(listener: Listener, study_uid: str) -> list[JobStatus]:
    study_id = _study(listener, study_uid).id
    return [j.status for j in jobs(listener) if j.study_id == study_id]


def _storescu(listener: Listener, path: Path) -> None:
    """DCMTK's storescu sends ``path`` on its own association (released when it is done)."""
    result = storescu("127.0.0.1", listener.settings.listener_port, [path], called_aet="CXR_GATEWAY")
    assert result.returncode == 0


def _assembler_passed(listener: Listener, shared_dir: Path) -> None:
    """Send a fresh study on an association aborted at once and wait until it is queued: an aborted
    association's study waits out the whole quiet period (a released one closes after a short grace), so
    by then the assembler has looked at every study received before it (quiet for longer), and whatever
    it did not queue, it held on purpose. The positive event that stands in for a fixed sleep."""
    marker = generate_uid()
    with association(scu(), listener.settings) as assoc:
        assert store_status(assoc, _instance(shared_dir, marker)) == 0x0000
        assoc.abort()
    wait_for(lambda: _statuses(listener, marker) == [JobStatus.QUEUED])


def test_open_association_holds_the_study_and_release_restarts_the_quiet_period(
    listener: Listener, shared_dir: Path
) -> None:
    study_uid = generate_uid()
    with association(scu(), listener.settings) as assoc:
        assert store_status(assoc, _instance(shared_dir, study_uid)) == 0x0000
        stored_at = _study(listener, study_uid).last_received_at
        # Past the quiet period (a later study was queued), but the association sending it is still open.
        _assembler_passed(listener, shared_dir)
        assert _statuses(listener, study_uid) == [JobStatus.RECEIVED]
        released_at = datetime.now(UTC)
    # After the release the countdown restarts from the release, not from the instance.
    touched = wait_for(lambda: (s := _study(listener, study_uid)).last_received_at > stored_at and s)
    assert touched.last_received_at >= released_at
    job = wait_for(
        lambda: [j for j in jobs(listener) if j.study_id == touched.id and j.status == JobStatus.QUEUED]
    )[0]
    assert job.queued_at is not None
    grace = listener.settings.study_release_grace_seconds  # a released association's study closes sooner
    assert (job.queued_at - touched.last_received_at).total_seconds() >= grace - 0.05


def test_instances_after_a_finished_job_start_a_rerun_and_history_keeps_both(
    listener: Listener, shared_dir: Path, tmp_path: Path
) -> None:
    study_uid = generate_uid()
    first = tmp_path / "first.dcm"
    _instance(shared_dir, study_uid).save_as(first, enforce_file_format=True)
    _storescu(listener, first)
    [job1] = wait_for(lambda: [j for j in jobs(listener) if j.status == JobStatus.QUEUED])
    # The worker's part, done by hand: the job ran and finished.
    with listener.sessions.begin() as session:
        assert transition(session, job1.id, JobStatus.RUNNING, expected=[JobStatus.QUEUED])
        assert transition(session, job1.id, JobStatus.DONE, expected=[JobStatus.RUNNING])

    late = tmp_path / "late.dcm"
    _instance(shared_dir, study_uid).save_as(late, enforce_file_format=True)
    _storescu(listener, late)
    wait_for(lambda: len(jobs(listener)) == 2 and jobs(listener)[1].status == JobStatus.QUEUED)

    history = jobs(listener)
    assert [j.status for j in history] == [JobStatus.DONE, JobStatus.QUEUED]
    assert len({j.study_id for j in history}) == 1
    with listener.sessions() as session:
        events = {
            job.id: [
                e.status
                for e in session.scalars(
                    select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id)
                )
            ]
            for job in history
        }
    assert events[history[0].id] == [JobStatus.RECEIVED, JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.DONE]
    assert events[history[1].id] == [JobStatus.RECEIVED, JobStatus.QUEUED]
    assert _broker_messages(listener) == 2


def test_identical_resend_after_a_finished_job_does_not_rerun(
    listener: Listener, shared_dir: Path, tmp_path: Path
) -> None:
    path = tmp_path / "one.dcm"
    study_uid = generate_uid()
    _instance(shared_dir, study_uid).save_as(path, enforce_file_format=True)
    _storescu(listener, path)
    [job] = wait_for(lambda: [j for j in jobs(listener) if j.status == JobStatus.QUEUED])
    with listener.sessions.begin() as session:
        transition(session, job.id, JobStatus.DONE)
    _storescu(listener, path)
    _assembler_passed(listener, shared_dir)
    assert _statuses(listener, study_uid) == [JobStatus.DONE]
