"""No patient data in logs: canary names, IDs and UIDs go through the listener (every refusal path too) and
through ``cxr-gateway serve`` end to end; none of them may appear in any log line.

The in-process check captures records BEFORE the PHI filter of ``setup_logging`` (which masks
caret-separated names), so it proves that our code does not log them, not that the filter hid them.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from pydicom import Dataset, dcmread
from pydicom.filewriter import write_file_meta_info
from pynetdicom import _config
from pynetdicom.dsutils import create_file_meta, encode

from service.core.settings import Source
from tests.support.dcmtk import echoscu, storescu
from tests.support.gateway import GatewayProcesses, first_job_delivered
from tests.support.ingest import (
    CR_STORAGE,
    EXPLICIT_LE,
    association,
    ingest_settings,
    jobs,
    running_listener,
    scu,
    store_status,
    wait_for,
)
from tests.support.orthanc import OrthancServer

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"
NAME = "CANARY^PHI"
PATIENT_ID = "CANARY-ID-777"
ACCESSION = "CANARYACC77"
UID_ROOT = "1.2.826.0.1.3680043.10.1453.99.777."
STUDY_UID = UID_ROOT + "1"
SERIES_UID = UID_ROOT + "2"
SOP_UID = UID_ROOT + "3"


def _canary(shared_dir: Path, sop_uid: str = SOP_UID) -> Dataset:
    ds = dcmread(shared_dir / CR)
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.AccessionNumber = ACCESSION
    ds.PatientBirthDate = "19770707"
    ds.StudyInstanceUID = STUDY_UID
    ds.SeriesInstanceUID = SERIES_UID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return ds


def _leaks(text: str) -> list[str]:
    needles = [
        "CANARY",
        PATIENT_ID,
        ACCESSION,
        "19770707",
        STUDY_UID,
        SERIES_UID,
        SOP_UID,
        UID_ROOT,
        "<redacted>",
    ]
    return [n for n in needles if n in text]


def _raw(path: Path, ds: Dataset, *, sop_instance: str, cut: int = 0) -> Path:
    body = encode(ds, False, True)
    assert body is not None
    buf = io.BytesIO(b"\x00" * 128 + b"DICM")
    buf.seek(0, io.SEEK_END)
    write_file_meta_info(
        buf,
        create_file_meta(
            sop_class_uid=CR_STORAGE, sop_instance_uid=sop_instance, transfer_syntax=EXPLICIT_LE
        ),
    )
    buf.write(body[: len(body) - cut] if cut else body)
    path.write_bytes(buf.getvalue())
    return path


def test_listener_never_logs_patient_data(
    tmp_path: Path, shared_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = ingest_settings(
        tmp_path,
        study_quiet_seconds=0.2,
        sources=[
            Source(ae_title="PYNETSCU", host="127.0.0.1"),
            Source(ae_title="STORESCU", host="127.0.0.1"),
        ],
    )
    canary = _canary(shared_dir)
    path = tmp_path / "canary.dcm"
    canary.save_as(path, enforce_file_format=True)
    caplog.set_level(logging.DEBUG)  # everything of ours, at its most talkative
    caplog.set_level(logging.WARNING, logger="pynetdicom")  # as setup_logging sets it in production
    with running_listener(settings) as listener:
        assert storescu("127.0.0.1", settings.listener_port, [path], called_aet="CXR_GATEWAY").returncode == 0
        # duplicate, conflict, UID mismatch, truncation, missing UID, unknown peer, disk full
        changed = _canary(shared_dir)
        changed.ImageComments = "changed"
        with association(scu(), settings) as assoc:
            assert store_status(assoc, canary) == 0x0000
            assert store_status(assoc, changed) == 0x0000
        monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
        missing = _canary(shared_dir, UID_ROOT + "4")
        del missing.StudyInstanceUID
        crafted = [
            _raw(tmp_path / "mismatch.dcm", _canary(shared_dir, UID_ROOT + "5"), sop_instance=UID_ROOT + "6"),
            _raw(
                tmp_path / "cut.dcm", _canary(shared_dir, UID_ROOT + "7"), sop_instance=UID_ROOT + "7", cut=99
            ),
            _raw(tmp_path / "missing.dcm", missing, sop_instance=UID_ROOT + "4"),
        ]
        with association(scu(), settings) as assoc:
            assert [store_status(assoc, p) for p in crafted] == [0xA900, 0xC210, 0xC210]
        monkeypatch.undo()
        assert (
            echoscu(
                "127.0.0.1", settings.listener_port, called_aet="CXR_GATEWAY", calling_aet="STRANGER"
            ).returncode
            != 0
        )
        listener.intake.pressure.min_free_bytes = 2**62
        with association(scu(), settings) as assoc:
            assert store_status(assoc, _canary(shared_dir, UID_ROOT + "8")) == 0xA700
        listener.intake.pressure.min_free_bytes = 0
        # Let the assembler queue the job (it logs too).
        wait_for(lambda: [j for j in jobs(listener) if j.status == "queued"])

    text = "\n".join(
        r.getMessage()
        + (r.exc_text or "")
        + (logging.Formatter().formatException(r.exc_info) if r.exc_info else "")
        for r in caplog.records
    )
    assert "reason=uid_mismatch" in text and "reason=peer_not_allowed" in text, "the paths did run"
    assert _leaks(text) == [], f"patient data in the logs:\n{text}"


@pytest.fixture(scope="module")
def serve_logs(tmp_path_factory: pytest.TempPathFactory, shared_dir: Path) -> list[str]:
    """One canary study through ``cxr-gateway serve`` to an Orthanc destination; the processes' log lines."""
    from tests.support.peers import require_peer

    require_peer("orthanc")
    tmp_path = tmp_path_factory.mktemp("phi-serve")
    path = tmp_path / "canary.dcm"
    _canary(shared_dir).save_as(path, enforce_file_format=True)
    with OrthancServer(workdir=tmp_path / "orthanc") as orthanc:
        destinations = [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]
        with GatewayProcesses(tmp_path / "gw", commands=["serve"], destinations=destinations) as gw:
            sent = storescu("127.0.0.1", gw.listener_port, [path], called_aet=gw.ae_title)
            assert sent.returncode == 0, sent.stderr
            done = gw.wait_for_jobs(first_job_delivered, timeout=240)
            assert done[0]["status"] == "done", gw.log_tail()
            orthanc.wait_for_instances(2, timeout=60)  # the SR and the heatmap SC
            logs = gw.log_text()
    assert "queued job=" in logs, "the listener's log was captured"
    return logs.splitlines()


def test_serve_end_to_end_our_logs_carry_no_patient_data(serve_logs: list[str]) -> None:
    ours = [line for line in serve_logs if " highdicom." not in line]
    assert _leaks("\n".join(ours)) == [], "patient data in the logs:\n" + "\n".join(ours)


def test_serve_end_to_end_no_log_line_carries_patient_data(serve_logs: list[str]) -> None:
    assert _leaks("\n".join(serve_logs)) == []
