"""Bad input never takes the listener down, never leaves a partial file, and gets the right C-STORE status.

pynetdicom is the SCU: with ``STORE_SEND_CHUNKED_DATASET`` it sends a file's bytes after the meta header
as they are, and takes the command's SOP Class/Instance UIDs from the meta header. So a crafted file can
say one thing in its command and another in its data set, or end in the middle of an element.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import generate_uid
from pynetdicom import _config
from pynetdicom.dsutils import create_file_meta, encode

from service.core.models import Instance, Job
from service.listener_main import Listener
from service.scp.intake import Outcome, Received
from tests.support.dcmtk import echoscu, storescu
from tests.support.ingest import (
    CR_STORAGE,
    EXPLICIT_LE,
    SR_COMPREHENSIVE_3D,
    association,
    count,
    ingest_settings,
    instances,
    running_listener,
    scu,
    spool_files,
    store_status,
)
from worker.dicom.gate import check_header

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"
SR = "dicom/sr/tid1500-example.dcm"
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    with running_listener(ingest_settings(tmp_path)) as lst:
        yield lst


@pytest.fixture
def raw_send(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send files byte for byte (no pydicom decode/re-encode on the SCU side)."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


@pytest.fixture
def cr(shared_dir: Path) -> Dataset:
    ds = dcmread(shared_dir / CR)
    ds.StudyInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    return ds


def crafted(
    path: Path,
    body_of: Dataset,
    *,
    sop_class: str,
    sop_instance: str,
    cut: int = 0,
    body: bytes | None = None,
) -> Path:
    """A Part 10 file whose meta (so the C-STORE command) names ``sop_class``/``sop_instance``."""
    encoded = body if body is not None else encode(body_of, False, True)
    assert encoded is not None
    if cut:
        encoded = encoded[:-cut]
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(
        buf,
        create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=EXPLICIT_LE),
    )
    buf.write(encoded)
    path.write_bytes(buf.getvalue())
    return path


def _send(listener: Listener, path: Path) -> int:
    ae = scu(contexts=[(CR_STORAGE, [EXPLICIT_LE]), (DX_STORAGE, [EXPLICIT_LE])])
    with association(ae, listener.settings) as assoc:
        return store_status(assoc, path)


def _still_serving(listener: Listener) -> None:
    echo = echoscu("127.0.0.1", listener.settings.listener_port, called_aet="CXR_GATEWAY")
    assert echo.returncode == 0, echo.stderr


def _nothing_kept(listener: Listener) -> None:
    assert spool_files(listener.settings) == []
    assert count(listener, Instance) == 0
    assert count(listener, Job) == 0
    staging = listener.settings.spool_dir / ".incoming"
    assert not staging.exists() or list(staging.iterdir()) == []


@pytest.mark.usefixtures("raw_send")
@pytest.mark.parametrize("cut", [1, 7, 1000, 7_000_000], ids=["1-byte", "7-bytes", "1k", "most-of-pixels"])
def test_truncated_dataset_is_0xC210(listener: Listener, cr: Dataset, tmp_path: Path, cut: int) -> None:
    path = crafted(tmp_path / "cut.dcm", cr, sop_class=CR_STORAGE, sop_instance=cr.SOPInstanceUID, cut=cut)
    assert _send(listener, path) == 0xC210
    _nothing_kept(listener)
    _still_serving(listener)


@pytest.mark.usefixtures("raw_send")
def test_garbage_dataset_is_0xC210(listener: Listener, tmp_path: Path) -> None:
    noise = bytes((i * 7919 + 13) % 251 for i in range(50_000))
    path = crafted(
        tmp_path / "noise.dcm", Dataset(), sop_class=CR_STORAGE, sop_instance=generate_uid(), body=noise
    )
    assert _send(listener, path) == 0xC210
    _nothing_kept(listener)
    _still_serving(listener)


@pytest.mark.usefixtures("raw_send")
def test_sop_instance_in_dataset_differs_from_command_is_0xA900(
    listener: Listener, cr: Dataset, tmp_path: Path
) -> None:
    path = crafted(tmp_path / "other-uid.dcm", cr, sop_class=CR_STORAGE, sop_instance=generate_uid())
    assert _send(listener, path) == 0xA900
    _nothing_kept(listener)


@pytest.mark.usefixtures("raw_send")
def test_sop_class_in_dataset_differs_from_command_is_0xA900(
    listener: Listener, cr: Dataset, tmp_path: Path
) -> None:
    # The data set is a CR; the command (and presentation context) say DX.
    path = crafted(tmp_path / "other-class.dcm", cr, sop_class=DX_STORAGE, sop_instance=cr.SOPInstanceUID)
    assert _send(listener, path) == 0xA900
    _nothing_kept(listener)


@pytest.mark.usefixtures("raw_send")
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SOPInstanceUID", "SOPClassUID"])
def test_missing_uids_are_0xC210(
    listener: Listener, cr: Dataset, tmp_path: Path, keyword: str, caplog: pytest.LogCaptureFixture
) -> None:
    sop_instance = cr.SOPInstanceUID
    delattr(cr, keyword)
    path = crafted(tmp_path / "missing.dcm", cr, sop_class=CR_STORAGE, sop_instance=sop_instance)
    with caplog.at_level(logging.WARNING, logger="service.scp"):
        assert _send(listener, path) == 0xC210
    assert any("reason=missing_uids" in r.getMessage() for r in caplog.records)
    _nothing_kept(listener)


@pytest.mark.usefixtures("raw_send")
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_uids_never_reach_the_file_system(listener: Listener, cr: Dataset, tmp_path: Path) -> None:
    # Not a UID at all: refused. A valid but hostile-looking one: stored under a hash, inside the spool.
    cr.StudyInstanceUID = "../../../../tmp/escape"
    path = crafted(tmp_path / "escape.dcm", cr, sop_class=CR_STORAGE, sop_instance=cr.SOPInstanceUID)
    assert _send(listener, path) == 0xC210
    _nothing_kept(listener)

    cr.StudyInstanceUID = "1." + "2" * 62  # 64 characters, the longest legal UID
    path = crafted(tmp_path / "long.dcm", cr, sop_class=CR_STORAGE, sop_instance=cr.SOPInstanceUID)
    assert _send(listener, path) == 0x0000
    [stored] = spool_files(listener.settings)
    assert stored.resolve().is_relative_to(listener.settings.spool_dir.resolve())
    assert cr.StudyInstanceUID not in str(stored) and cr.SOPInstanceUID not in str(stored)


def test_handler_bug_costs_a_retry_not_the_listener(
    listener: Listener, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(rx: Received) -> Outcome:
        raise RuntimeError("bug")

    monkeypatch.setattr(listener.intake, "store", broken)
    with association(scu(), listener.settings) as assoc:
        assert store_status(assoc, dcmread(shared_dir / CR)) == 0xA700
    monkeypatch.undo()
    _still_serving(listener)
    with association(scu(), listener.settings) as assoc:
        assert store_status(assoc, dcmread(shared_dir / CR)) == 0x0000


def test_in_memory_receive_still_works_when_chunking_is_off(
    listener: Listener, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Other code in the process switched pynetdicom back to in-memory data sets: same result.
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", False)
    with association(scu(), listener.settings) as assoc:
        assert store_status(assoc, dcmread(shared_dir / CR)) == 0x0000
    [inst] = instances(listener)
    spooled = dcmread(listener.settings.spool_dir / inst.spool_path)
    assert spooled.PixelData == dcmread(shared_dir / CR).PixelData


def test_structured_report_in_the_study_is_accepted(listener: Listener, shared_dir: Path) -> None:
    # A PACS routing a whole study sends its SRs too: success, stored; the worker's gate skips it later.
    result = storescu(
        "127.0.0.1", listener.settings.listener_port, [shared_dir / SR], called_aet="CXR_GATEWAY"
    )
    assert result.returncode == 0, result.stderr
    assert "Success" in result.stderr + result.stdout
    [inst] = instances(listener)
    assert inst.sop_class_uid == SR_COMPREHENSIVE_3D
    decision = check_header(dcmread(listener.settings.spool_dir / inst.spool_path))
    assert not decision.eligible and decision.reason == "not_image_object"
