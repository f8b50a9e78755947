"""What comes back to the PACS, through the real path: every chest encoding, non-chest input, re-runs,
a destination that goes away and comes back, and one that refuses until an admin fixes it and replays."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import pytest
from pydicom import dcmread

from service.core.settings import DEFAULT_BUNDLE
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses
from tests.support.orthanc import OrthancServer
from tests.support.peers import tool
from tests.support.studies import with_fresh_uids
from tests.support.waiting import wait_until
from worker.inference.bundle import load_bundle

SR = "1.2.840.10008.5.1.4.1.1.88.34"  # Comprehensive 3D SR: the measurement report
REPORT = "1.2.840.10008.5.1.4.1.1.88.33"  # Comprehensive SR: the results (and not-analysed) report
SC = "1.2.840.10008.5.1.4.1.1.7"
PER_IMAGE = 3  # the default outputs: measurement SR, results SR, heatmap SC
# The listener's line for a re-sent identical instance (service.scp.intake).
DUPLICATE_LOGGED = "duplicate instance ignored"
CHEST_FILES = [
    "cr-pa-mono1-explicit-le.dcm",
    "cr-pa-mono1-j2k-lossless.dcm",
    "cr-pa-mono1-j2k-lossy.dcm",
    "sc-pa-jpeg-baseline.dcm",
    "sc-pa-jpeg-baseline-mono1-label.dcm",
]


def _gateway(tmp_path: Path, orthanc: OrthancServer, **env: str) -> GatewayProcesses:
    dest = [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    return GatewayProcesses(tmp_path / "gw", destinations=dest, env=env)


@pytest.fixture
def gateway(tmp_path: Path, orthanc: OrthancServer) -> Iterator[GatewayProcesses]:
    with _gateway(tmp_path, orthanc) as gw:
        try:
            yield gw
        except BaseException:
            print(gw.log_tail(200))
            raise


def _send(gw: GatewayProcesses, files: list[Path]) -> None:
    result = storescu("127.0.0.1", gw.listener_port, files, called_aet=gw.ae_title)
    assert result.returncode == 0, result.stdout + result.stderr


def _by_study(orthanc: OrthancServer, tmp_path: Path) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for iid in orthanc.instances():
        ds = dcmread(orthanc.download_instance(iid, tmp_path / f"got-{iid}.dcm"))
        out.setdefault(str(ds.StudyInstanceUID), []).append(ds)
    return out


def _settled(jobs: list[dict[str, Any]], count: int, status: str) -> bool:
    """``count`` jobs, each finished as ``status`` with every delivery delivered: nothing more is sent."""
    return len(jobs) == count and all(
        j["status"] == status and j["deliveries"] and all(d["status"] == "delivered" for d in j["deliveries"])
        for j in jobs
    )


def gateway_result(gw: GatewayProcesses, source: Any) -> dict[str, Any]:
    """The job result's entry for ``source`` (a dataset), from the gateway's API."""
    for job in gw.api("/api/jobs")["items"]:
        for image in gw.api(f"/api/jobs/{job['id']}")["result"]["images"]:
            if image["sop_instance_uid"] == str(source.SOPInstanceUID):
                return dict(image)
    raise AssertionError("no job result for the source")


def _dsrdump(path: str) -> str:
    return subprocess.run(
        [tool("dsrdump", "dcmtk"), "+Pt", path], capture_output=True, text=True, check=True
    ).stdout


def test_every_chest_encoding_gets_valid_reports_and_sc(
    gateway: GatewayProcesses, orthanc: OrthancServer, shared_dir: Path, tmp_path: Path
) -> None:
    sources = [with_fresh_uids(shared_dir / "dicom/chest" / n, tmp_path / "in" / n) for n in CHEST_FILES]
    _send(gateway, sources)
    orthanc.wait_for_instances(PER_IMAGE * len(sources), timeout=300)
    studies = _by_study(orthanc, tmp_path)
    for src_path in sources:
        src = dcmread(src_path, stop_before_pixels=True)
        outputs = studies[str(src.StudyInstanceUID)]
        assert sorted(str(d.SOPClassUID) for d in outputs) == sorted([SR, REPORT, SC]), src_path.name
        for ds in outputs:
            assert dciodvfy_errors(Path(ds.filename)) == [], (src_path.name, ds.SOPClassUID)
        sr = next(d for d in outputs if d.SOPClassUID == SR)
        sc = next(d for d in outputs if d.SOPClassUID == SC)
        hd.sr.Comprehensive3DSR.from_dataset(sr)  # highdicom reads it back
        dump = _dsrdump(sr.filename)
        assert "# TID 1500 (DCMR)" in dump
        # One localised group per present finding, each with its image region and a finding-named value.
        present = len(gateway_result(gateway, src)["present"])
        assert dump.count('"Measurement Group"') == dump.count("SCOORD") == present
        # "<finding> probability" for a calibrated bundle (the shipped one is), else "<finding> score".
        kind = "probability" if load_bundle(DEFAULT_BUNDLE).calibrated else "score"
        assert dump.count(f' {kind}")=') == present
        report = _dsrdump(next(d for d in outputs if d.SOPClassUID == REPORT).filename)
        assert '"X-Ray Report"' in report and report.count(f' {kind}")=') == 14
        evidence = sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
        assert evidence.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
        assert sc.BurnedInAnnotation == "YES" and list(sc.ImageType)[:2] == ["DERIVED", "SECONDARY"]
    jobs = gateway.wait_for_jobs(
        lambda js: len(js) == len(sources) and all(j["status"] == "done" for j in js)
    )
    trap = [
        j for j in jobs if gateway.api(f"/api/jobs/{j['id']}")["result"]["images"][0]["inverted_by_heuristic"]
    ]
    assert len(trap) == 1, "only the MONOCHROME1-labelled SC trap is flipped back by the image check"


def test_non_chest_input_gets_a_not_analysed_sr(
    gateway: GatewayProcesses, orthanc: OrthancServer, shared_dir: Path, tmp_path: Path
) -> None:
    sources = [shared_dir / "dicom/not-chest/cr-tibia-j2k-lossless.dcm"]
    _send(gateway, sources)
    # Settled (skipped, its report delivered): the gateway sends nothing more for this study after that.
    (job,) = gateway.wait_for_jobs(lambda js: _settled(js, 1, "skipped"))
    assert job["reason_code"] == "not_chest"
    studies = _by_study(orthanc, tmp_path)
    (outputs,) = studies.values()
    assert [str(d.SOPClassUID) for d in outputs] == [REPORT]
    assert dciodvfy_errors(Path(outputs[0].filename)) == []
    assert "not_chest" in _dsrdump(outputs[0].filename)


def test_rerun_replaces_instead_of_duplicating(
    gateway: GatewayProcesses, orthanc: OrthancServer, shared_dir: Path, tmp_path: Path
) -> None:
    first = with_fresh_uids(shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm", tmp_path / "a.dcm")
    study_uid = str(dcmread(first, stop_before_pixels=True).StudyInstanceUID)
    _send(gateway, [first])
    orthanc.wait_for_instances(PER_IMAGE, timeout=120)
    gateway.wait_for_jobs(lambda js: js and js[0]["status"] == "done")
    # A late image for the same study: a re-run over both images, whose outputs for the first image
    # carry the same UIDs as before, so the PACS holds one set of outputs per image.
    second = with_fresh_uids(
        shared_dir / "dicom/chest/cr-pa-mono1-j2k-lossy.dcm", tmp_path / "b.dcm", study_uid=study_uid
    )
    _send(gateway, [second])
    # Both jobs settled: every output of the re-run is in the PACS, and nothing more is on its way.
    jobs = gateway.wait_for_jobs(lambda js: _settled(js, 2, "done"))
    assert sorted(len(j["deliveries"]) for j in jobs) == [PER_IMAGE, 2 * PER_IMAGE]
    assert len(orthanc.instances()) == 2 * PER_IMAGE
    # And sending the very same instances again changes nothing at all. A job is made (or not) while the
    # listener answers the C-STORE, so once it has logged both as duplicates there is nothing left to come.
    _send(gateway, [first, second])
    wait_until(
        lambda: gateway.log_text().count(DUPLICATE_LOGGED) == 2,
        30,
        "both re-sent instances seen as duplicates",
    )
    assert gateway.api("/api/jobs")["items"] == jobs
    assert len(orthanc.instances()) == 2 * PER_IMAGE


def test_destination_down_then_back(tmp_path: Path, orthanc: OrthancServer, shared_dir: Path) -> None:
    source = with_fresh_uids(shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm", tmp_path / "a.dcm")
    # Backoff from 0.5 s: the retry after Orthanc is back comes within seconds, not at a 16 s step.
    with _gateway(
        tmp_path, orthanc, CXR_DELIVERY_MAX_RETRIES="8", CXR_DELIVERY_RETRY_BASE_SECONDS="0.5"
    ) as gw:
        orthanc.stop()
        _send(gw, [source])
        gw.wait_for_jobs(lambda js: js and any(d["status"] == "retrying" for d in js[0]["deliveries"]))
        orthanc.start(keep_ports=True)
        jobs = gw.wait_for_jobs(
            lambda js: (
                js
                and len(js[0]["deliveries"]) == PER_IMAGE
                and all(d["status"] == "delivered" for d in js[0]["deliveries"])
            ),
            timeout=180,
        )
        assert max(d["attempts"] for d in jobs[0]["deliveries"]) >= 2
        assert len(orthanc.instances()) == PER_IMAGE
        # Each attempt is on record: refused while the PACS was down, then delivered.
        for d in gw.api(f"/api/jobs/{jobs[0]['id']}")["deliveries"]:
            outcomes = [a["outcome"] for a in d["history"]]
            assert len(outcomes) == d["attempts"] and outcomes[-1] == "delivered"
            assert all(a["error"] for a in d["history"][:-1])
        assert any(len(d["history"]) >= 2 for d in gw.api(f"/api/jobs/{jobs[0]['id']}")["deliveries"])


def test_refusing_destination_dead_letters_and_replay_delivers(
    tmp_path: Path, orthanc_factory: Any, shared_dir: Path
) -> None:
    # This PACS only takes stores from known modalities, and does not know us yet.
    pacs: OrthancServer = orthanc_factory(
        extra_config={"DicomAlwaysAllowStore": False, "DicomCheckModalityHost": False}
    )
    source = with_fresh_uids(shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm", tmp_path / "a.dcm")
    # Two retries are enough to show retry-then-give-up; Orthanc never answers the stores it drops, so
    # each attempt lasts the delivery timeout (30 s by default).
    with _gateway(
        tmp_path,
        pacs,
        CXR_DELIVERY_MAX_RETRIES="2",
        CXR_DELIVERY_TIMEOUT_SECONDS="4",
        CXR_DELIVERY_RETRY_BASE_SECONDS="1",
    ) as gw:
        _send(gw, [source])
        gw.wait_for_jobs(
            lambda js: (
                js
                and len(js[0]["deliveries"]) == PER_IMAGE
                and all(d["status"] == "dead_letter" for d in js[0]["deliveries"])
            ),
            timeout=180,
        )
        dead = gw.api("/api/deliveries?status=dead_letter")
        assert len(dead) == PER_IMAGE
        assert pacs.instances() == []
        pacs.add_modality("GATEWAY", "CXR_GATEWAY", "127.0.0.1", gw.listener_port)
        for d in dead:
            r = gw.post(f"/api/deliveries/{d['id']}/replay")
            assert r.status_code == 200
        jobs = gw.wait_for_jobs(
            lambda js: all(d["status"] == "delivered" for d in js[0]["deliveries"]), timeout=120
        )
        assert len(pacs.instances()) == PER_IMAGE
        for d in gw.api(f"/api/jobs/{jobs[0]['id']}")["deliveries"]:
            # Refused (Orthanc drops the store: no response, retried), given up, replayed, delivered.
            outcomes = [a["outcome"] for a in d["history"]]
            assert outcomes[-2:] == ["dead_letter", "delivered"] and set(outcomes[:-2]) <= {"retrying"}
            assert all(a["error"] for a in d["history"][:-1]) and d["history"][-1]["error"] is None
