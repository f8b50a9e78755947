"""A chest study goes PACS → listener → queue → DenseNet-121 → two SRs + heatmap SC → PACS, on real peers."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.support.dciodvfy import dciodvfy_errors
from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses
from tests.support.orthanc import OrthancServer

SR_STORAGE = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR: the measurement report
REPORT_STORAGE = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: the results report
SC_STORAGE = "1.2.840.10008.5.1.4.1.1.7"


def _send_and_check(gw: GatewayProcesses, orthanc: OrthancServer, source: Path, tmp_path: Path) -> None:
    result = storescu("127.0.0.1", gw.listener_port, [source], called_aet=gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr

    ids = orthanc.wait_for_instances(3, timeout=180)
    src = dcmread(source, stop_before_pixels=True)
    found: dict[str, Path] = {}
    for n, instance_id in enumerate(ids):
        path = orthanc.download_instance(instance_id, tmp_path / f"out-{n}.dcm")
        ds = dcmread(path)
        assert ds.StudyInstanceUID == src.StudyInstanceUID, "results must land in the source study"
        assert ds.SeriesInstanceUID != src.SeriesInstanceUID
        found[str(ds.SOPClassUID)] = path
        assert "not for diagnostic use" in str(ds.SeriesDescription).lower()
    assert set(found) == {SR_STORAGE, REPORT_STORAGE, SC_STORAGE}
    for path in found.values():
        assert dciodvfy_errors(path) == [], f"dciodvfy errors in {path.name}"

    sr = dcmread(found[SR_STORAGE])
    assert sr.VerificationFlag == "UNVERIFIED"
    sc = dcmread(found[SC_STORAGE])
    assert sc.PhotometricInterpretation == "RGB"
    assert sc.BurnedInAnnotation == "YES"

    jobs = gw.wait_for_jobs(
        lambda js: js and all(d["status"] == "delivered" for d in js[0]["deliveries"]) and js[0]["deliveries"]
    )
    assert len(jobs) == 1
    job = jobs[0]
    assert job["status"] == "done"
    stages = job["stages"]
    assert stages["queued_at"] and stages["started_at"] and stages["finished_at"]
    assert stages["received_at"] <= stages["queued_at"] <= stages["started_at"] <= stages["finished_at"]
    detail = gw.api(f"/api/jobs/{job['id']}")
    probabilities = detail["result"]["images"][0]["probabilities"]
    assert len(probabilities) == 14 and all(0.0 <= p <= 1.0 for p in probabilities.values())


def _destination(orthanc: OrthancServer) -> list[dict[str, Any]]:
    return [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]


def _run(
    tmp_path: Path,
    orthanc: OrthancServer,
    shared_dir: Path,
    commands: Sequence[str],
    env: dict[str, str] | None = None,
) -> None:
    source = shared_dir / "dicom" / "chest" / "cr-pa-mono1-explicit-le.dcm"
    with GatewayProcesses(
        tmp_path / "gw", commands=commands, destinations=_destination(orthanc), env=env
    ) as gw:
        try:
            _send_and_check(gw, orthanc, source, tmp_path)
        except BaseException:
            print(gw.log_tail(200))
            raise


def test_serve_on_embedded_defaults(tmp_path: Path, orthanc: OrthancServer, shared_dir: Path) -> None:
    """`cxr-gateway serve`: SQLite and the filesystem broker under the data dir, the shipped bundle."""
    _run(tmp_path, orthanc, shared_dir, ["serve"])


@pytest.mark.postgres
@pytest.mark.redis
def test_parts_on_redis_and_postgres(
    tmp_path: Path,
    orthanc: OrthancServer,
    shared_dir: Path,
    postgres_url: str,
    redis_url: str,
) -> None:
    """Production shape: listener, worker and dashboard as separate processes on Redis + PostgreSQL."""
    env = {"CXR_DATABASE_URL": postgres_url, "CXR_BROKER_URL": redis_url}
    _run(tmp_path, orthanc, shared_dir, ["listener", "worker", "dashboard"], env)
