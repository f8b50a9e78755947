"""Retention rules on real files: a pass removes exactly the settled, old, unlabelled (or exported)
studies' spooled images and outputs, and never a file of an unfinished or undelivered job."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import make_session_factory, migrate
from service.core.models import (
    FindingFeedback,
    Instance,
    Job,
    LabelImport,
    ReferenceLabel,
    StudyExport,
    StudyPurge,
)
from service.core.retention import disk_use, purge, purged_at
from service.core.settings import Settings, load_settings
from service.core.status import DeliveryStatus, JobStatus
from tests.unit.admin.conftest import T0, make_job

NOW = T0 + timedelta(days=40)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = load_settings(data_dir=tmp_path, retention_days=30)
    migrate(s)
    return s


@pytest.fixture
def sessions(settings: Settings) -> sessionmaker[Session]:
    return make_session_factory(settings)


def _delivery(status: DeliveryStatus, n: int, received: datetime) -> dict[str, Any]:
    delivered = status == DeliveryStatus.DELIVERED
    return {
        "ae_title": "PACS",
        "sop_instance_uid": f"2.25.{n}",
        "kind": "sr",
        "output_path": "x.dcm",
        "status": status,
        "delivered_at": received + timedelta(seconds=20) if delivered else None,
    }


def _study(
    sessions: sessionmaker[Session],
    settings: Settings,
    name: str,
    status: JobStatus = JobStatus.DONE,
    deliveries: list[DeliveryStatus] = (DeliveryStatus.DELIVERED,),  # type: ignore[assignment]
    *,
    days_ago: float = 40,
    now: datetime = NOW,
) -> tuple[str, list[Path]]:
    """A job with two spooled files and an output folder on disk; returns (job id, every file)."""
    received = now - timedelta(days=days_ago)
    job_id = make_job(
        sessions,
        status,
        received=received,
        instances=[f"1.2.{name}.1", f"1.2.{name}.2"],
        deliveries=[_delivery(d, n, received) for n, d in enumerate(deliveries)],
    )
    files = []
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.study.last_received_at = received
        for inst in s.scalars(select(Instance).where(Instance.study_id == job.study_id)):
            inst.spool_path = f"{name}/{inst.sop_instance_uid}.dcm"
            path = settings.spool_dir / inst.spool_path
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"D" * 1000)
            files.append(path)
    out = settings.output_dir / job_id
    out.mkdir(parents=True)
    for kind in ("sr-0.dcm", "sc-0.dcm"):
        (out / kind).write_bytes(b"O" * 500)
        files.append(out / kind)
    return job_id, files


def _study_id(sessions: sessionmaker[Session], job_id: str) -> int:
    with sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        return job.study_id


def test_a_pass_removes_exactly_what_is_due(sessions: sessionmaker[Session], settings: Settings) -> None:
    due, due_files = _study(sessions, settings, "due")
    failed, failed_files = _study(sessions, settings, "failed", JobStatus.FAILED, [])
    recent, recent_files = _study(sessions, settings, "recent", days_ago=10)
    _retrying, retrying_files = _study(
        sessions, settings, "retry", deliveries=[DeliveryStatus.DELIVERED, DeliveryStatus.RETRYING]
    )
    _dead, dead_files = _study(sessions, settings, "dead", deliveries=[DeliveryStatus.DEAD_LETTER])
    _pending, pending_files = _study(sessions, settings, "pending", deliveries=[DeliveryStatus.PENDING])
    _running, running_files = _study(sessions, settings, "running", JobStatus.RUNNING, [])
    _queued, queued_files = _study(sessions, settings, "queued", JobStatus.QUEUED, [])

    dry = purge(sessions, settings, NOW, dry_run=True)
    assert sorted(dry.purged) == sorted([_study_id(sessions, due), _study_id(sessions, failed)])
    assert dry.files == 8 and dry.bytes == 2 * (2000 + 1000)
    assert (
        dry.kept_unsettled == 5
    )  # retrying, dead letter, pending, running, queued (recent is not looked at)
    assert all(p.exists() for p in due_files)  # a dry run deletes nothing

    report = purge(sessions, settings, NOW)
    assert report.purged == dry.purged and report.files == 8 and report.bytes == 6000
    for path in due_files + failed_files:
        assert not path.exists(), path
    assert not (settings.output_dir / due).exists()
    for path in recent_files + retrying_files + dead_files + pending_files + running_files + queued_files:
        assert path.exists(), path
    with sessions() as s:
        row = s.get(StudyPurge, _study_id(sessions, due))
        assert row is not None and row.files == 4 and row.bytes == 3000
        job = s.get(Job, due)
        assert job is not None and purged_at(s, job) == NOW
        other = s.get(Job, recent)
        assert other is not None and purged_at(s, other) is None
    # Nothing new since: a second pass finds nothing to do.
    assert purge(sessions, settings, NOW + timedelta(hours=1)).purged == []


def test_unfinished_later_job_keeps_the_whole_study(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    job_id, files = _study(sessions, settings, "two")
    with sessions.begin() as s:
        first = s.get(Job, job_id)
        assert first is not None
        s.add(Job(study_id=first.study_id, status=JobStatus.RECEIVED, received_at=NOW - timedelta(days=35)))
    assert purge(sessions, settings, NOW).purged == []
    assert all(p.exists() for p in files)


def test_labelled_studies_wait_for_their_export(sessions: sessionmaker[Session], settings: Settings) -> None:
    labelled, labelled_files = _study(sessions, settings, "lab")
    judged, judged_files = _study(sessions, settings, "fb")
    with sessions.begin() as s:
        imp = LabelImport(username="alice", sha256="0" * 64, studies=1)
        s.add(imp)
        s.flush()
        s.add(
            ReferenceLabel(
                study_id=_study_id(sessions, labelled), finding="Effusion", present=True, import_id=imp.id
            )
        )
        s.add(
            FindingFeedback(
                job_id=judged,
                study_id=_study_id(sessions, judged),
                finding="Mass",
                verdict="agree",
                model_present=False,
                username="rita",
            )
        )
    report = purge(sessions, settings, NOW)
    assert report.purged == [] and report.kept_labelled == 2
    assert all(p.exists() for p in labelled_files + judged_files)
    with sessions.begin() as s:
        s.add(StudyExport(study_id=_study_id(sessions, labelled), export_name="export-1"))
    assert purge(sessions, settings, NOW).purged == [_study_id(sessions, labelled)]
    assert not any(p.exists() for p in labelled_files) and all(p.exists() for p in judged_files)
    keep_none = settings.model_copy(update={"retention_keep_labelled": False})
    assert purge(sessions, keep_none, NOW).purged == [_study_id(sessions, judged)]


def test_disk_use_by_age(settings: Settings) -> None:
    import os

    for n, days in enumerate([0.5, 3, 10, 45]):
        path = settings.spool_dir / f"f{n}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x" * (n + 1))
        stamp = NOW.timestamp() - days * 86400
        os.utime(path, (stamp, stamp))
    use = disk_use(settings, NOW)
    assert [(b.label, b.files, b.bytes) for b in use["spool"]] == [
        ("< 1 d", 1, 1),
        ("1–7 d", 1, 2),
        ("7–30 d", 1, 3),
        ("> 30 d", 1, 4),
    ]
    assert sum(b.files for b in use["outputs"]) == 0
