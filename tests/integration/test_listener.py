"""The listener through the real path: DCMTK storescu/echoscu → pynetdicom → spool + SQLite → broker."""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import func, select

from service.core.db import migrate
from service.core.models import Instance, Job, JobEvent
from service.core.settings import Settings, load_settings
from service.core.status import JobStatus
from service.listener_main import Listener
from tests.support.dcmtk import echoscu, storescu
from tests.support.ingest import running_listener
from tests.support.net import free_port
from tests.support.waiting import wait_until


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = load_settings(
        data_dir=tmp_path / "data",
        listener_host="127.0.0.1",
        listener_port=free_port(),
        study_quiet_seconds=0.5,
        destinations=[],
    )
    migrate(s)
    return s


@pytest.fixture
def listener(settings: Settings) -> Iterator[Listener]:
    with running_listener(settings) as lst:
        yield lst


def _broker_messages(settings: Settings) -> list[Path]:
    return sorted((settings.broker_dir / "messages").glob("*.msg"))


def test_echo(listener: Listener, settings: Settings) -> None:
    result = echoscu("127.0.0.1", settings.listener_port, called_aet=settings.listener_ae_title)
    assert result.returncode == 0, result.stderr


def test_store_is_durable_and_queues_one_job_after_quiet(
    listener: Listener, settings: Settings, shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="service.scp.intake")
    source = shared_dir / "dicom" / "chest" / "cr-pa-mono1-explicit-le.dcm"
    result = storescu("127.0.0.1", settings.listener_port, [source], called_aet=settings.listener_ae_title)
    assert result.returncode == 0, result.stdout + result.stderr

    with listener.sessions() as session:
        inst = session.scalars(select(Instance)).one()
        job = session.scalars(select(Job)).one()
        assert job.status in {JobStatus.RECEIVED, JobStatus.QUEUED}
    spooled = settings.spool_dir / inst.spool_path
    assert hashlib.sha256(spooled.read_bytes()).hexdigest() == inst.sha256
    # The spooled file is the same dataset (pixel data byte-identical).
    assert dcmread(spooled).PixelData == dcmread(source).PixelData
    assert str(dcmread(source).SOPInstanceUID) not in str(spooled)

    assert len(wait_until(lambda: _broker_messages(settings), 10, "the job's message on the broker")) == 1
    with listener.sessions() as session:
        job = session.scalars(select(Job)).one()
        assert job.status == JobStatus.QUEUED
        assert job.queued_at is not None and job.queued_at >= job.received_at
        events = session.scalars(select(JobEvent.status).order_by(JobEvent.id)).all()
        assert events == [JobStatus.RECEIVED, JobStatus.QUEUED]

    # The same instance again: success, stored once, no second job.
    again = storescu("127.0.0.1", settings.listener_port, [source], called_aet=settings.listener_ae_title)
    assert again.returncode == 0
    # A job is made (or not) while the listener answers the C-STORE: once it has logged the re-send as a
    # duplicate, nothing more can come of it.
    wait_until(
        lambda: any("duplicate instance ignored" in r.getMessage() for r in caplog.records),
        10,
        "the re-sent instance seen as a duplicate",
    )
    with listener.sessions() as session:
        assert session.scalar(select(func.count()).select_from(Instance)) == 1
        assert session.scalar(select(func.count()).select_from(Job)) == 1
    assert len(_broker_messages(settings)) == 1


def test_wrong_called_ae_is_rejected(listener: Listener, settings: Settings) -> None:
    result = echoscu("127.0.0.1", settings.listener_port, called_aet="SOMEONE_ELSE")
    assert result.returncode != 0
