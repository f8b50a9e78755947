"""Re-sends: identical → success, stored once, one job; same UID with other content → first kept, conflict."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from service.core.models import Instance, InstanceConflict, Job
from service.listener_main import Listener
from tests.support.dcmtk import storescu
from tests.support.ingest import (
    association,
    count,
    ingest_settings,
    instances,
    running_listener,
    scu,
    spool_files,
    store_status,
)

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    # A long quiet period: these tests look at the rows, not at queueing.
    with running_listener(ingest_settings(tmp_path, study_quiet_seconds=600)) as lst:
        yield lst


@pytest.fixture
def cr(shared_dir: Path, tmp_path: Path) -> Path:
    ds = dcmread(shared_dir / CR)
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    path = tmp_path / "cr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _conflicts(listener: Listener) -> list[InstanceConflict]:
    with listener.sessions() as session:
        return list(session.scalars(select(InstanceConflict)))


def test_identical_resend_is_success_stored_once_one_job(listener: Listener, cr: Path) -> None:
    port = listener.settings.listener_port
    # Twice in one association, then again in a second one.
    first = storescu("127.0.0.1", port, [cr, cr], called_aet="CXR_GATEWAY")
    assert first.returncode == 0, first.stderr
    assert (first.stderr + first.stdout).count("Success") >= 2
    again = storescu("127.0.0.1", port, [cr], called_aet="CXR_GATEWAY")
    assert again.returncode == 0, again.stderr

    assert count(listener, Instance) == 1
    assert count(listener, Job) == 1
    [inst] = instances(listener)
    [spooled] = spool_files(listener.settings)
    assert hashlib.sha256(spooled.read_bytes()).hexdigest() == inst.sha256
    assert _conflicts(listener) == []


def test_same_uid_with_other_content_keeps_first_and_records_conflict(
    listener: Listener, cr: Path, tmp_path: Path
) -> None:
    port = listener.settings.listener_port
    assert storescu("127.0.0.1", port, [cr], called_aet="CXR_GATEWAY").returncode == 0
    [inst] = instances(listener)
    [spooled] = spool_files(listener.settings)
    first_bytes = spooled.read_bytes()

    altered: Dataset = dcmread(cr)
    altered.ImageComments = "re-sent with a change"
    changed = tmp_path / "changed.dcm"
    altered.save_as(changed, enforce_file_format=True)
    for _ in range(2):
        with association(scu(), listener.settings) as assoc:
            assert store_status(assoc, dcmread(changed)) == 0x0000

    assert count(listener, Instance) == 1
    assert count(listener, Job) == 1
    assert spool_files(listener.settings) == [spooled]
    assert spooled.read_bytes() == first_bytes, "the first copy must stay untouched"
    [conflict] = _conflicts(listener)
    assert conflict.instance_id == inst.id
    assert conflict.sha256 != inst.sha256
    assert conflict.count == 2
    assert conflict.calling_ae_title == "PYNETSCU"


def test_concurrent_sends_of_one_instance_store_it_once(listener: Listener, cr: Path) -> None:
    ds = dcmread(cr)
    other = dcmread(cr)
    other.ImageComments = "a different copy"
    statuses: list[int] = []
    lock = threading.Lock()

    def send(dataset: Dataset) -> None:
        with association(scu(), listener.settings) as assoc:
            status = store_status(assoc, dataset)
        with lock:
            statuses.append(status)

    threads = [threading.Thread(target=send, args=(ds if i % 2 else other,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert statuses == [0x0000] * 6
    assert count(listener, Instance) == 1
    assert count(listener, Job) == 1
    [inst] = instances(listener)
    # Exactly the acknowledged-first copy on disk, whichever won.
    [spooled] = spool_files(listener.settings)
    assert listener.settings.spool_dir / inst.spool_path == spooled
    assert hashlib.sha256(spooled.read_bytes()).hexdigest() == inst.sha256
    assert len(_conflicts(listener)) == 1
