"""Shadow mode against a real PACS (Orthanc): a shadow job runs and keeps its outputs on the gateway
(viewable in the dashboard) but sends nothing; a destination set live beside a shadow one gets its
objects, the shadow one none."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select

from service.admin.app import create_app
from service.core.db import make_session_factory, migrate
from service.core.models import Delivery, Job
from service.core.settings import Destination, Settings, load_settings
from service.core.status import DeliveryStatus, JobStatus, Mode
from tests.support.orthanc import OrthancServer
from tests.support.studies import enqueue_files, with_fresh_uids
from tests.unit.admin.conftest import VIEWER
from worker.delivery import deliver
from worker.pipeline import process_study
from worker.runtime import Runtime

STUDY = "dicom/chest/sc-pa-jpeg-baseline.dcm"
USERS = [{"username": VIEWER[0], "password": VIEWER[1], "role": "viewer"}]


def _settings(tmp_path: Path, orthanc: OrthancServer, **overrides: Any) -> Settings:
    settings = load_settings(data_dir=tmp_path, dashboard_users=USERS, **overrides)
    migrate(settings)
    return settings


def _pacs(orthanc: OrthancServer, ae_title: str, mode: Mode | None = None) -> Destination:
    return Destination(ae_title=ae_title, host="127.0.0.1", port=orthanc.dicom_port, mode=mode)


def _run(rt: Runtime, path: Path) -> tuple[str, list[int]]:
    job_id = enqueue_files(rt, [path])
    ids = process_study(job_id, rt)
    for delivery_id in ids:
        assert deliver(delivery_id, rt.settings, rt.sessions) == DeliveryStatus.DELIVERED
    return job_id, ids


def _sop_uids_in(orthanc: OrthancServer) -> set[str]:
    return {
        orthanc.rest_get(f"/instances/{i}")["MainDicomTags"]["SOPInstanceUID"] for i in orthanc.instances()
    }


def test_a_shadow_job_sends_nothing_and_its_outputs_are_viewable(
    tmp_path: Path, shared_dir: Path, orthanc: OrthancServer
) -> None:
    settings = _settings(tmp_path, orthanc, mode="shadow", destinations=[_pacs(orthanc, orthanc.aet)])
    rt = Runtime(settings=settings, sessions=make_session_factory(settings))
    try:
        shadow_job, ids = _run(rt, with_fresh_uids(shared_dir / STUDY, tmp_path / "a.dcm"))
        assert ids == []
        with rt.sessions() as s:
            job = s.get(Job, shadow_job)
            assert job is not None and job.status == JobStatus.DONE and job.mode == Mode.SHADOW
            assert s.scalars(select(Delivery)).all() == []
        outputs = sorted((settings.output_dir / shadow_job).glob("*.dcm"))
        assert [p.name for p in outputs] == ["report-1.dcm", "sc-1.dcm", "sr-1.dcm"]
        shadow_uids = {str(dcmread(p).SOPInstanceUID) for p in outputs}

        # The dashboard shows the job as shadow, with its heatmap rendered from the kept output.
        with TestClient(create_app(settings, rt.sessions), follow_redirects=False) as client:
            client.auth = VIEWER
            page = client.get(f"/jobs/{shadow_job}")
            assert page.status_code == 200 and 'id="shadow-banner"' in page.text
            assert "outputs kept here, nothing sent" in page.text
            png = client.get(f"/api/jobs/{shadow_job}/heatmaps/0.png")
            assert png.status_code == 200 and png.content.startswith(b"\x89PNG")
            assert client.get("/api/jobs").json()["items"][0]["mode"] == "shadow"
    finally:
        rt.close()

    # The positive event: the same gateway switched live sends the next job's three objects, and only
    # those reach the PACS.
    live = _settings(tmp_path, orthanc, mode="live", destinations=[_pacs(orthanc, orthanc.aet)])
    rt = Runtime(settings=live, sessions=make_session_factory(live))
    try:
        live_job, ids = _run(rt, with_fresh_uids(shared_dir / STUDY, tmp_path / "b.dcm"))
        assert len(ids) == 3
        with rt.sessions() as s:
            job = s.get(Job, live_job)
            assert job is not None and job.mode == Mode.LIVE
            sent = set(s.scalars(select(Delivery.sop_instance_uid)))
    finally:
        rt.close()
    in_pacs = _sop_uids_in(orthanc)
    assert in_pacs == sent and not in_pacs & shadow_uids


def test_a_shadow_destination_beside_a_live_one_gets_nothing(
    tmp_path: Path, shared_dir: Path, orthanc: OrthancServer
) -> None:
    destinations = [_pacs(orthanc, "LIVEPACS", Mode.LIVE), _pacs(orthanc, "SHADOWPACS", Mode.SHADOW)]
    settings = _settings(tmp_path, orthanc, destinations=destinations)
    rt = Runtime(settings=settings, sessions=make_session_factory(settings))
    try:
        job_id, _ = _run(rt, with_fresh_uids(shared_dir / STUDY, tmp_path / "a.dcm"))
        with rt.sessions() as s:
            rows = s.scalars(select(Delivery)).all()
            assert {d.ae_title for d in rows} == {"LIVEPACS"} and len(rows) == 3
            assert {d.status for d in rows} == {DeliveryStatus.DELIVERED}
            job = s.get(Job, job_id)
            assert job is not None and job.mode == Mode.LIVE
    finally:
        rt.close()
    assert _sop_uids_in(orthanc) == {d.sop_instance_uid for d in rows}
