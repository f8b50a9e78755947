"""Pull from the PACS against a real Orthanc as the Q/R SCP: a chest study stored into Orthanc with DCMTK's
storescu is pulled by accession number through the dashboard API, arrives at our listener by C-MOVE and
runs as a job; an unknown key ends 'not_found', an unreachable PACS 'failed' with the reason."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from service.core import pulls
from service.core.models import Instance, Pull
from service.core.pulls import PullStatus
from service.dicomnet.pulls import PullRunner
from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses
from tests.support.ingest import count, ingest_settings, running_listener
from tests.support.net import free_port
from tests.support.orthanc import OrthancServer
from tests.support.peers import require_peer
from tests.support.waiting import wait_until

CR = "dicom/chest/cr-pa-mono1-j2k-lossy.dcm"


def _chest_study(tmp_path: Path, shared_dir: Path, accession: str) -> Path:
    ds = dcmread(shared_dir / CR)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber = accession
    path = tmp_path / "study.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_pull_by_accession_through_the_api_runs_the_study(tmp_path: Path, shared_dir: Path) -> None:
    require_peer("orthanc", "dcmtk")
    gw = GatewayProcesses(tmp_path / "gw", commands=["serve"])
    with OrthancServer(
        workdir=tmp_path / "orthanc", modalities={"GATEWAY": [gw.ae_title, "127.0.0.1", gw.listener_port]}
    ) as orthanc:
        gw.env["CXR_PULL_PEER"] = (
            f'{{"ae_title": "{orthanc.aet}", "host": "127.0.0.1", "port": {orthanc.dicom_port}}}'
        )
        gw.env["CXR_PULL_POLL_SECONDS"] = "0.2"
        path = _chest_study(tmp_path, shared_dir, "ACC-PULL-1")
        sent = storescu("127.0.0.1", orthanc.dicom_port, [path], called_aet=orthanc.aet)
        assert sent.returncode == 0, sent.stderr
        orthanc.wait_for_instances(1)
        with gw:
            started = time.monotonic()
            asked = gw.post("/api/pull", json={"accession_number": "ACC-PULL-1"})
            assert asked.status_code == 202, asked.text
            pull_id = asked.json()["id"]

            def finished() -> dict[str, Any] | None:
                row: dict[str, Any] = gw.api(f"/api/pulls/{pull_id}")
                return row if row["status"] not in {"queued", "running"} else None

            row = wait_until(finished, 60, "the pull finished", interval=0.2, detail=gw.log_tail)
            pulled = time.monotonic() - started
            assert row["status"] == "done", row
            assert (row["studies_found"], row["instances_moved"], row["instances_failed"]) == (1, 1, 0)
            done = gw.wait_for_jobs(lambda js: js and js[0]["status"] in {"done", "failed", "skipped"}, 300)
            ran = time.monotonic() - started
            assert done[0]["status"] == "done", gw.log_tail()
            detail = gw.api(f"/api/jobs/{done[0]['id']}")
            assert detail["calling_ae_title"] == orthanc.aet, "the study came by the PACS's C-MOVE"
            audit = gw.api("/api/audit")["items"]
            assert any(a["action"] == "pull" and a["target_id"] == str(pull_id) for a in audit)
            assert "ACC-PULL-1" not in gw.log_text(), "the key asked for stays out of the logs"
    print(f"\npull: C-FIND + C-MOVE done {pulled:.2f} s after the request; job done after {ran:.1f} s")


def test_the_api_refuses_a_bad_key(tmp_path: Path) -> None:
    gw = GatewayProcesses(
        tmp_path / "gw",
        commands=["dashboard"],
        env={"CXR_PULL_PEER": '{"ae_title": "PACS", "host": "127.0.0.1", "port": 104}'},
    )
    with gw:
        for body in ({}, {"accession_number": "A", "study_instance_uid": "1.2"}, {"study_instance_uid": "x"}):
            assert gw.post("/api/pull", json=body).status_code == 422, body
        assert gw.post("/api/pull", json={"accession_number": "A"}, auth=("nobody", "x")).status_code == 401


@pytest.fixture
def orthanc(tmp_path: Path) -> Any:
    require_peer("orthanc")
    with OrthancServer(workdir=tmp_path / "orthanc") as server:
        yield server


def _pull(settings: Any, sessions: Any, **key: str | None) -> Pull:
    with sessions.begin() as s:
        pull_id = pulls.create(s, "admin", study_uid=key.get("study"), accession=key.get("accession")).id
    assert PullRunner(settings, sessions).run_one()
    with sessions() as s:
        row = s.get(Pull, pull_id)
        assert row is not None and row.finished_at is not None and row.finished_at <= datetime.now(UTC)
        return row


def test_an_unknown_key_ends_not_found(tmp_path: Path, orthanc: OrthancServer) -> None:
    settings = ingest_settings(
        tmp_path, pull_peer={"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}
    )
    with running_listener(settings) as listener:
        row = _pull(settings, listener.sessions, accession="NO-SUCH-ACC")
        assert (row.status, row.studies_found) == (PullStatus.NOT_FOUND, 0)
        row = _pull(settings, listener.sessions, study=generate_uid())
        assert row.status == PullStatus.NOT_FOUND
        assert count(listener, Instance) == 0


def test_a_pacs_that_is_down_fails_with_the_reason(tmp_path: Path) -> None:
    settings = ingest_settings(
        tmp_path, pull_peer={"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}
    )
    with running_listener(settings) as listener:
        row = _pull(settings, listener.sessions, accession="ACC")
        assert row.status == PullStatus.FAILED
        assert row.detail is not None and "delivery_unreachable" in row.detail


def test_a_pacs_that_does_not_know_our_ae_fails_the_move(
    tmp_path: Path, shared_dir: Path, orthanc: OrthancServer
) -> None:
    """Orthanc finds the study but has no modality for our AE title: the C-MOVE fails, and says so."""
    require_peer("dcmtk")
    path = _chest_study(tmp_path, shared_dir, "ACC-UNKNOWN-AE")
    assert storescu("127.0.0.1", orthanc.dicom_port, [path], called_aet=orthanc.aet).returncode == 0
    settings = ingest_settings(
        tmp_path,
        pull_peer={"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port},
        pull_move_ae_title="NOT_KNOWN",
    )
    with running_listener(settings) as listener:
        row = _pull(settings, listener.sessions, accession="ACC-UNKNOWN-AE")
        assert (row.status, row.studies_found, row.instances_moved) == (PullStatus.FAILED, 1, 0)
        assert row.detail is not None and "C-MOVE final status 0x" in row.detail
