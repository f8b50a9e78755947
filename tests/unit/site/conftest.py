"""A dashboard on a fresh SQLite database with an admin, a reader and a viewer, and seeded analysed jobs."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.admin.app import create_app
from service.core.db import make_session_factory
from service.core.models import Job, Study
from service.core.settings import Settings
from service.core.status import JobStatus
from service.site.findings import ModelFindings, bundle_findings
from tests.unit.admin.conftest import ADMIN, T0, VIEWER, dashboard_settings, login, make_job

READER = ("rita", "rita-secret-pw")
USERS = [
    {"username": ADMIN[0], "password": ADMIN[1], "role": "admin"},
    {"username": READER[0], "password": READER[1], "role": "reader"},
    {"username": VIEWER[0], "password": VIEWER[1], "role": "viewer"},
]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return dashboard_settings(tmp_path, USERS)


@pytest.fixture
def sessions(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(settings)


@pytest.fixture
def model(settings: Settings) -> ModelFindings:
    found = bundle_findings(settings.model_bundle)
    assert len(found.labels) == 14
    return found


@pytest.fixture
def app(settings: Settings, sessions: sessionmaker[Session]) -> FastAPI:
    return create_app(settings, sessions)


def _client(app: FastAPI, who: tuple[str, str]) -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as client:
        client.auth = who
        yield client


@pytest.fixture
def admin(app: FastAPI) -> Iterator[TestClient]:
    yield from _client(app, ADMIN)


@pytest.fixture
def reader(app: FastAPI) -> Iterator[TestClient]:
    yield from _client(app, READER)


@pytest.fixture
def viewer(app: FastAPI) -> Iterator[TestClient]:
    yield from _client(app, VIEWER)


@pytest.fixture
def browser(app: FastAPI) -> Iterator[Callable[[tuple[str, str]], tuple[TestClient, str]]]:
    clients: list[TestClient] = []

    def make(who: tuple[str, str]) -> tuple[TestClient, str]:
        client = TestClient(app, follow_redirects=False)
        clients.append(client)
        return client, login(client, who)

    yield make
    for c in clients:
        c.close()


def analysed_result(
    scores: Mapping[str, float], points: Mapping[str, float], version: str = "v1"
) -> dict[str, Any]:
    """A worker-shaped result (worker/analysis.py) of one analysed image with these scores."""
    return {
        "bundle": {"name": "cxr14_densenet121", "version": version},
        "images": [
            {
                "sop_instance_uid": "1.2.3.4.5",
                "probabilities": {k: round(float(v), 6) for k, v in scores.items()},
                "present": [k for k, v in scores.items() if round(float(v), 6) >= points[k]],
                "score_kind": "probability",
                "rows": 512,
                "columns": 512,
                "regions": [],
            }
        ],
        "gate": {},
    }


def seed_job(
    sessions: sessionmaker[Session],
    scores: Mapping[str, float],
    points: Mapping[str, float],
    *,
    patient_id: str = "PID-1",
    accession: str = "ACC-1",
    version: str = "v1",
    received: datetime = T0,
    status: JobStatus = JobStatus.DONE,
    deliveries: list[dict[str, Any]] | None = None,
) -> tuple[str, str]:
    """A done job over one analysed image; returns (job id, Study Instance UID)."""
    result = analysed_result(scores, points, version) if status == JobStatus.DONE else None
    job_id = make_job(
        sessions,
        status,
        patient_id=patient_id,
        accession=accession,
        received=received,
        result=result,
        deliveries=deliveries,
    )
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.bundle_version = version if status == JobStatus.DONE else job.bundle_version
        uid = s.scalar(select(Study.study_instance_uid).where(Study.id == job.study_id))
    assert uid is not None
    return job_id, uid
