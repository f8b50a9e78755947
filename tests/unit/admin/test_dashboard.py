from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.admin.app import create_app
from service.core.db import make_session_factory, migrate
from service.core.models import Job, Study
from service.core.settings import load_settings
from service.core.status import JobStatus


@pytest.fixture
def sessions(tmp_path: Path) -> sessionmaker[Session]:
    settings = load_settings(data_dir=tmp_path)
    migrate(settings)
    return make_session_factory(settings)


@pytest.fixture
def client(sessions: sessionmaker[Session], tmp_path: Path) -> TestClient:
    return TestClient(create_app(load_settings(data_dir=tmp_path), sessions))


def _job(sessions: sessionmaker[Session], status: JobStatus, ae: str = "MODALITY") -> str:
    t0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    with sessions.begin() as s:
        study = Study(study_instance_uid=f"1.2.3.{status}", patient_name="Doe^Jane", patient_id="PID-1")
        s.add(study)
        s.flush()
        job = Job(
            study_id=study.id,
            status=status,
            calling_ae_title=ae,
            received_at=t0,
            queued_at=t0 + timedelta(seconds=2),
            started_at=t0 + timedelta(seconds=3),
            finished_at=t0 + timedelta(seconds=10) if status == JobStatus.DONE else None,
        )
        s.add(job)
        s.flush()
        return job.id


def test_api_lists_jobs_with_stage_times(client: TestClient, sessions: sessionmaker[Session]) -> None:
    done = _job(sessions, JobStatus.DONE)
    _job(sessions, JobStatus.RUNNING)
    page = client.get("/api/jobs").json()
    assert page["total"] == 2
    by_id = {j["id"]: j for j in page["items"]}
    assert by_id[done]["stages"]["queue_wait_s"] == 1.0
    assert by_id[done]["stages"]["run_s"] == 7.0
    assert by_id[done]["stages"]["total_s"] == 10.0
    only_done = client.get("/api/jobs", params={"status": "done"}).json()
    assert [j["id"] for j in only_done["items"]] == [done]
    assert client.get("/api/jobs", params={"status": "bogus"}).status_code == 422
    assert client.get(f"/api/jobs/{done}").json()["status"] == "done"
    assert client.get("/api/jobs/nope").status_code == 404


def test_page_escapes_and_hides_patient_data(client: TestClient, sessions: sessionmaker[Session]) -> None:
    _job(sessions, JobStatus.DONE, ae="<script>x</script>")
    html = client.get("/").text
    assert "<script>x</script>" not in html
    assert "&lt;script&gt;x&lt;/script&gt;" in html
    assert "Doe^Jane" not in html and "PID-1" not in html
    assert "not for diagnostic use" in html


def test_healthz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
