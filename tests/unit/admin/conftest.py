"""A dashboard on a fresh SQLite database with three accounts, and clients acting as each of them."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.admin.app import create_app
from service.admin.auth import hash_password
from service.core.db import make_session_factory, migrate
from service.core.models import Delivery, DeliveryAttempt, Instance, Job, JobEvent, Study
from service.core.settings import Settings, load_settings
from service.core.status import JobStatus

ADMIN = ("alice", "alice-secret-pw")
VIEWER = ("victor", "victor-secret-pw")
HASHED_ADMIN = ("hana", "hana-secret-pw")


def users() -> list[dict[str, str]]:
    return [
        {"username": ADMIN[0], "password": ADMIN[1], "role": "admin"},
        {"username": VIEWER[0], "password": VIEWER[1], "role": "viewer"},
        {"username": HASHED_ADMIN[0], "password_hash": hash_password(HASHED_ADMIN[1]), "role": "admin"},
    ]


@pytest.fixture(scope="session")
def user_list() -> list[dict[str, str]]:
    return users()  # argon2 hashing once per session


def dashboard_settings(data_dir: Path, user_list: list[dict[str, str]]) -> Settings:
    """Settings of a dashboard with these accounts on a fresh SQLite database under ``data_dir``."""
    s = load_settings(data_dir=data_dir, dashboard_users=user_list, broker_url=None, database_url=None)
    migrate(s)
    return s


@pytest.fixture
def settings(tmp_path: Path, user_list: list[dict[str, str]]) -> Settings:
    return dashboard_settings(tmp_path, user_list)


@pytest.fixture
def sessions(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(settings)


@pytest.fixture
def app(settings: Settings, sessions: sessionmaker[Session]) -> FastAPI:
    return create_app(settings, sessions)


@pytest.fixture
def anon(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as client:
        yield client


@pytest.fixture
def admin(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as client:
        client.auth = ADMIN
        yield client


@pytest.fixture
def viewer(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app, follow_redirects=False) as client:
        client.auth = VIEWER
        yield client


def csrf_of(html: str) -> str:
    match = re.search(r'name="csrf_token" value="([^"]+)"', html)
    assert match, "no CSRF token in the page"
    return match.group(1)


def login(client: TestClient, who: tuple[str, str]) -> str:
    """Sign in through the form like a browser; returns the session's CSRF token."""
    token = csrf_of(client.get("/login").text)
    r = client.post("/login", data={"username": who[0], "password": who[1], "csrf_token": token, "next": "/"})
    assert r.status_code == 303, r.text
    return csrf_of(client.get("/").text)


@pytest.fixture
def browser(app: FastAPI) -> Callable[[tuple[str, str]], tuple[TestClient, str]]:
    clients: list[TestClient] = []

    def make(who: tuple[str, str]) -> tuple[TestClient, str]:
        client = TestClient(app, follow_redirects=False)
        clients.append(client)
        return client, login(client, who)

    yield make  # type: ignore[misc]
    for c in clients:
        c.close()


T0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)


def make_job(
    sessions: sessionmaker[Session],
    status: JobStatus,
    *,
    ae: str = "MODALITY",
    patient_name: str = "Doe^Jane",
    patient_id: str = "PID-12345",
    accession: str = "ACC987654",
    received: datetime = T0,
    result: dict[str, Any] | None = None,
    deliveries: list[dict[str, Any]] | None = None,
    instances: list[str] | None = None,
) -> str:
    final = JobStatus(status).is_final
    with sessions.begin() as s:
        study = Study(
            study_instance_uid=f"1.2.3.{datetime.now(UTC).timestamp()}.{id(object())}",
            patient_name=patient_name,
            patient_id=patient_id,
            accession_number=accession,
        )
        s.add(study)
        s.flush()
        for n, uid in enumerate(instances or []):
            s.add(
                Instance(
                    study_id=study.id,
                    sop_instance_uid=uid,
                    sop_class_uid="1.2.840.10008.5.1.4.1.1.1",
                    transfer_syntax_uid="1.2.840.10008.1.2.1",
                    modality="CR",
                    spool_path=f"x/{n}",
                    size_bytes=1,
                    sha256="0" * 64,
                    calling_ae_title=ae,
                    received_at=received,
                )
            )
        job = Job(
            study_id=study.id,
            status=status,
            calling_ae_title=ae,
            received_at=received,
            created_at=received,
            queued_at=received + timedelta(seconds=2) if status != JobStatus.RECEIVED else None,
            started_at=received + timedelta(seconds=3) if final or status == JobStatus.RUNNING else None,
            finished_at=received + timedelta(seconds=10) if final else None,
            result=result,
            bundle_version="0.0.1-test" if final else None,
        )
        s.add(job)
        s.flush()
        s.add(JobEvent(job_id=job.id, status=JobStatus.RECEIVED, at=received))
        if job.queued_at:
            s.add(JobEvent(job_id=job.id, status=JobStatus.QUEUED, at=job.queued_at))
        if job.started_at:
            s.add(JobEvent(job_id=job.id, status=JobStatus.RUNNING, at=job.started_at))
        if job.finished_at:
            s.add(JobEvent(job_id=job.id, status=status, at=job.finished_at))
        for d in deliveries or []:
            fields = dict(d)
            history = [DeliveryAttempt(**a) for a in fields.pop("history", [])]
            s.add(Delivery(job_id=job.id, host="127.0.0.1", port=104, history=history, **fields))
        return job.id
