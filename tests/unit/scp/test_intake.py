"""Intake on a real SQLite database and spool; the received file is made here instead of by pynetdicom."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select
from sqlalchemy.exc import OperationalError

from service.core.db import make_session_factory, migrate
from service.core.models import Instance, InstanceConflict, Job
from service.core.settings import Settings, load_settings
from service.core.status import ReasonCode
from service.scp.intake import Intake, Received, StoreStatus

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = load_settings(data_dir=tmp_path / "data", spool_min_free_bytes=0)
    migrate(s)
    s.spool_dir.mkdir(parents=True)
    return s


@pytest.fixture
def intake(settings: Settings) -> Intake:
    return Intake(settings, make_session_factory(settings))


def _received(shared_dir: Path, tmp_path: Path, name: str, comment: str | None = None) -> Received:
    ds = dcmread(shared_dir / CR)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
    if comment:
        ds.ImageComments = comment
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return Received(path, str(ds.SOPClassUID), "1.2.3.4.5", str(ds.file_meta.TransferSyntaxUID), "TESTAE")


def _spool_files(settings: Settings) -> list[Path]:
    return sorted(p for p in settings.spool_dir.rglob("*.dcm"))


def test_store_moves_the_file_and_records_rows(
    intake: Intake, settings: Settings, shared_dir: Path, tmp_path: Path
) -> None:
    rx = _received(shared_dir, tmp_path, "a.dcm")
    size = rx.path.stat().st_size
    outcome = intake.store(rx)
    assert outcome.status == StoreStatus.SUCCESS and outcome.job_id and outcome.study_id
    assert not rx.path.exists(), "moved, not copied"
    [spooled] = _spool_files(settings)
    assert spooled.stat().st_size == size


def test_lost_race_with_different_content_keeps_the_winner(
    intake: Intake, settings: Settings, shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert intake.store(_received(shared_dir, tmp_path, "first.dcm")).status == StoreStatus.SUCCESS
    [winner] = _spool_files(settings)
    # The second association looked before the first committed: it saw nothing.
    real_lookup = intake._lookup
    monkeypatch.setattr(intake, "_lookup", lambda uid, digest: real_lookup("not-there", digest))
    outcome = intake.store(_received(shared_dir, tmp_path, "second.dcm", comment="other"))
    assert outcome.status == StoreStatus.SUCCESS and outcome.reason == ReasonCode.DUPLICATE_CONFLICT
    assert _spool_files(settings) == [winner], "the loser's file is removed, the winner's kept"
    with intake._sessions() as session:
        assert len(session.scalars(select(Instance)).all()) == 1
        assert len(session.scalars(select(InstanceConflict)).all()) == 1
        assert len(session.scalars(select(Job)).all()) == 1


def test_database_failure_leaves_nothing_in_the_spool(
    intake: Intake, settings: Settings, shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(*args: object, **kwargs: object) -> None:
        raise OperationalError("INSERT ... ('CANARY^PHI')", {}, Exception("connection refused"))

    monkeypatch.setattr(intake, "_record", down)
    rx = _received(shared_dir, tmp_path, "a.dcm")
    outcome = intake.store(rx)
    assert (outcome.status, outcome.reason) == (StoreStatus.OUT_OF_RESOURCES, ReasonCode.DATABASE_UNAVAILABLE)
    assert _spool_files(settings) == []


def test_database_errors_are_logged_without_their_parameters(
    intake: Intake,
    shared_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    def down(*args: object, **kwargs: object) -> None:
        raise OperationalError(
            "INSERT INTO studies (patient_name) VALUES (?)", ("CANARY^PHI",), Exception("x")
        )

    monkeypatch.setattr(intake, "_lookup", down)
    intake.store(_received(shared_dir, tmp_path, "a.dcm"))
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "reason=database_unavailable" in text
    assert "CANARY" not in text and "INSERT" not in text


def test_spool_write_failure_is_0xA700(
    intake: Intake, shared_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("service.scp.spool.adopt_durably", full)
    outcome = intake.store(_received(shared_dir, tmp_path, "a.dcm"))
    assert (outcome.status, outcome.reason) == (StoreStatus.OUT_OF_RESOURCES, ReasonCode.SPOOL_WRITE_FAILED)


@pytest.mark.filterwarnings("ignore:The value length")
def test_uid_longer_than_64_is_refused(intake: Intake, shared_dir: Path, tmp_path: Path) -> None:
    ds = dcmread(shared_dir / CR)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = "1.2." + "3" * 63  # 67 characters
    path = tmp_path / "long.dcm"
    ds.save_as(path, enforce_file_format=True)
    rx = Received(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID), "1.2.840.10008.1.2.1", "TESTAE")
    outcome = intake.store(rx)
    assert (outcome.status, outcome.reason) == (StoreStatus.CANNOT_UNDERSTAND, ReasonCode.INVALID_UIDS)
