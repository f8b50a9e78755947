"""Notification rows on SQLite for the notify unit tests: a study, a done job with a result, and Settings
with rules and channels."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from service.core.db import make_session_factory, migrate
from service.core.models import Job, Study
from service.core.settings import Settings, load_settings
from service.core.status import JobStatus
from service.notify.config import Priority
from service.notify.message import Urgent

FINISHED = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def result(score: float = 0.91, present: bool = True, version: str = "1.2.0") -> dict[str, Any]:
    return {
        "bundle": {"name": "cxr14_densenet121", "version": version},
        "images": [
            {
                "sop_instance_uid": "1.2.826.0.1.3680043.8.498.1",
                "probabilities": {"Pneumothorax": score, "Effusion": 0.10},
                "present": ["Pneumothorax"] if present else [],
                "score_kind": "probability",
            }
        ],
    }


def make_settings(tmp_path: Path, **overrides: Any) -> Settings:
    secret = tmp_path / "webhook-secret"
    secret.write_text("s3cret\n")
    channels = [
        {"type": "hl7", "name": "ris", "host": "127.0.0.1", "port": 9, "timeout_seconds": 2},
        {"type": "fhir", "name": "ehr", "url": "http://127.0.0.1:9/fhir", "timeout_seconds": 2},
        {"type": "webhook", "name": "oncall", "url": "http://127.0.0.1:9/hook", "secret_file": str(secret)},
    ]
    values: dict[str, Any] = {
        "data_dir": tmp_path,
        "notify_rules": [{"name": "ptx", "finding": "Pneumothorax"}],
        "notify_channels": channels,
        "notify_retry_base_seconds": 0.0,
        **overrides,
    }
    return load_settings(**values)


def database(settings: Settings) -> sessionmaker[Session]:
    migrate(settings)
    return make_session_factory(settings)


def done_job(
    sessions: sessionmaker[Session], res: dict[str, Any] | None = None, accession: str = "ACC1"
) -> str:
    with sessions.begin() as s:
        study = Study(
            study_instance_uid=f"1.2.3.{accession}",
            patient_id="PAT7",
            patient_name="Doe^Jane",
            accession_number=accession,
        )
        s.add(study)
        s.flush()
        job = Job(study_id=study.id, status=JobStatus.DONE, result=res or result(), finished_at=FINISHED)
        s.add(job)
        s.flush()
        return job.id


def urgent(**changes: Any) -> Urgent:
    values: dict[str, Any] = {
        "notification_id": 42,
        "job_id": "job1",
        "revision": 0,
        "rule": "ptx",
        "priority": Priority.STAT,
        "label": "Pneumothorax",
        "score": 0.8731,
        "score_kind": "probability",
        "min_score": None,
        "sop_instance_uid": "1.2.3.4.5",
        "study_instance_uid": "1.2.3.4",
        "accession_number": "ACC1",
        "patient_id": "PAT7",
        "patient_name": "Doe^Jane^^Dr",
        "bundle_name": "cxr14_densenet121",
        "bundle_version": "1.2.0",
        "observed_at": FINISHED,
    }
    values.update(changes)
    return Urgent(**values)
