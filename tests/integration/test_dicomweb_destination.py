"""DICOMweb destinations against a real Orthanc with its DICOMweb plugin: the delivery path
(worker.delivery.deliver) sends by STOW-RS with and without HTTP basic authentication, a wrong password is
a dead letter that says why, an archive that is down is retried, and a replay after the fix delivers.
The last test sends a study through ``cxr-gateway serve`` and finds its SR and SC in Orthanc by QIDO-RS."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydicom import dcmread
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import make_session_factory, migrate
from service.core.deliveries import transition
from service.core.models import Delivery
from service.core.settings import Settings, load_settings
from service.core.status import DeliveryStatus
from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses, first_job_delivered
from tests.support.net import free_port
from tests.support.orthanc import OrthancServer
from tests.support.peers import require_peer
from tests.support.rows import add_job
from worker.delivery import deliver
from worker.dicom.priority import read_priority

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"
SC = "dicom/chest/sc-pa-jpeg-baseline.dcm"
USER, PASSWORD = "cxr", "stow-secret"


class AuthOrthanc(OrthancServer):
    """Orthanc with HTTP basic authentication on; the helper's own REST client logs in too."""

    def __init__(self, **kwargs: Any) -> None:
        extra = {"AuthenticationEnabled": True, "RegisteredUsers": {USER: PASSWORD}}
        super().__init__(dicomweb=True, extra_config=extra, **kwargs)

    def _wait_ready(self) -> None:
        if self._client is not None:
            self._client.close()
        self._client = httpx.Client(base_url=self.url, timeout=30.0, trust_env=False, auth=(USER, PASSWORD))
        super()._wait_ready()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[OrthancServer]:
    require_peer("orthanc")
    with AuthOrthanc(workdir=tmp_path_factory.mktemp("orthanc-auth")) as server:
        yield server


def _settings(tmp_path: Path, url: str, password_file: Path | None = None) -> Settings:
    dest: dict[str, Any] = {"type": "dicomweb", "name": "ORTHANC_WEB", "url": url, "outputs": ["sr", "sc"]}
    if password_file is not None:
        dest["auth"] = {"type": "basic", "username": USER, "password_file": str(password_file)}
    settings = load_settings(
        data_dir=tmp_path / "data", destinations=[dest], delivery_max_retries=2, delivery_retry_base_seconds=0
    )
    migrate(settings)
    return settings


def _delivery(settings: Settings, sessions: sessionmaker[Session], source: Path) -> int:
    """A pending delivery of ``source`` (copied into the outputs) to the settings' one destination."""
    (dest,) = settings.destinations
    out = settings.output_dir / "job" / source.name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(source.read_bytes())
    with sessions.begin() as s:
        add_job(s, str(dcmread(source, stop_before_pixels=True).StudyInstanceUID), id="j" * 32)
        row = Delivery(
            job_id="j" * 32,
            ae_title=dest.ae_title,
            host=dest.host,
            port=dest.port,
            sop_instance_uid=str(dcmread(source, stop_before_pixels=True).SOPInstanceUID),
            kind="sc",
            output_path=f"job/{source.name}",
            status=DeliveryStatus.PENDING,
            next_attempt_at=datetime.now(UTC),
        )
        s.add(row)
        s.flush()
        return row.id


def _row(sessions: sessionmaker[Session], delivery_id: int) -> Delivery:
    with sessions() as s:
        row = s.get(Delivery, delivery_id)
        assert row is not None
        return row


def _qido_instances(orthanc: OrthancServer, study_uid: str) -> list[str]:
    found = orthanc.client.get(f"/dicom-web/studies/{study_uid}/instances")
    if found.status_code == 204 or not found.content:
        return []
    found.raise_for_status()
    return [item["00080018"]["Value"][0] for item in found.json()]


def test_stow_with_basic_auth_delivers_and_qido_finds_it(
    secured: OrthancServer, tmp_path: Path, shared_dir: Path
) -> None:
    password = tmp_path / "password"
    password.write_text(PASSWORD)
    settings = _settings(tmp_path, f"{secured.url}/dicom-web", password)
    sessions = make_session_factory(settings)
    delivery_id = _delivery(settings, sessions, shared_dir / SC)
    assert deliver(delivery_id, settings, sessions) == DeliveryStatus.DELIVERED
    ds = dcmread(shared_dir / SC, stop_before_pixels=True)
    assert str(ds.SOPInstanceUID) in _qido_instances(secured, str(ds.StudyInstanceUID))
    (attempt,) = _row(sessions, delivery_id).history
    assert attempt.outcome == DeliveryStatus.DELIVERED


def test_wrong_password_is_a_dead_letter_that_says_why_and_a_replay_after_the_fix_delivers(
    secured: OrthancServer, tmp_path: Path, shared_dir: Path
) -> None:
    password = tmp_path / "password"
    password.write_text("not-the-password")
    settings = _settings(tmp_path, f"{secured.url}/dicom-web", password)
    sessions = make_session_factory(settings)
    delivery_id = _delivery(settings, sessions, shared_dir / CR)
    assert deliver(delivery_id, settings, sessions) == DeliveryStatus.DEAD_LETTER
    row = _row(sessions, delivery_id)
    assert row.last_error is not None and "401" in row.last_error and "not authorised" in row.last_error
    # The admin fixes the password file and replays (the dashboard's replay is this same transition).
    password.write_text(PASSWORD)
    with sessions.begin() as s:
        assert transition(s, delivery_id, DeliveryStatus.PENDING, next_attempt_at=datetime.now(UTC))
    assert deliver(delivery_id, settings, sessions) == DeliveryStatus.DELIVERED
    ds = dcmread(shared_dir / CR, stop_before_pixels=True)
    assert str(ds.SOPInstanceUID) in _qido_instances(secured, str(ds.StudyInstanceUID))


def test_an_archive_that_is_down_is_retried_then_dead_lettered(tmp_path: Path, shared_dir: Path) -> None:
    settings = _settings(tmp_path, f"http://127.0.0.1:{free_port()}/dicom-web")
    sessions = make_session_factory(settings)
    delivery_id = _delivery(settings, sessions, shared_dir / CR)
    outcomes = []
    for _ in range(3):
        outcomes.append(deliver(delivery_id, settings, sessions))
    assert outcomes == [DeliveryStatus.RETRYING, DeliveryStatus.RETRYING, DeliveryStatus.DEAD_LETTER]
    row = _row(sessions, delivery_id)
    assert row.last_error is not None and "no answer" in row.last_error


def test_a_study_through_serve_reaches_orthanc_by_stow_rs(tmp_path: Path, shared_dir: Path) -> None:
    """No authentication here (the module's other tests have it): SR and SC found by QIDO-RS."""
    require_peer("orthanc", "dcmtk")
    with OrthancServer(workdir=tmp_path / "orthanc", dicomweb=True) as orthanc:
        destinations = [
            {
                "type": "dicomweb",
                "name": "ORTHANC_WEB",
                "url": f"{orthanc.url}/dicom-web",
                "outputs": ["sr", "sc"],
            }
        ]
        # A rule that always fires (min_score 0): the SR carries its priority hint.
        rules = '[{"name": "any-ptx", "finding": "Pneumothorax", "min_score": 0.0, "priority": "stat"}]'
        env = {"CXR_NOTIFY_RULES": rules}
        with GatewayProcesses(tmp_path / "gw", commands=["serve"], destinations=destinations, env=env) as gw:
            sent = storescu("127.0.0.1", gw.listener_port, [shared_dir / CR], called_aet=gw.ae_title)
            assert sent.returncode == 0, sent.stderr
            done = gw.wait_for_jobs(first_job_delivered, timeout=300)
            assert done[0]["status"] == "done", gw.log_tail()
            assert {d["ae_title"] for d in done[0]["deliveries"]} == {"ORTHANC_WEB"}
        study_uid = str(dcmread(shared_dir / CR, stop_before_pixels=True).StudyInstanceUID)
        found = orthanc.client.get(f"/dicom-web/studies/{study_uid}/series").json()
        kinds = {item["00080060"]["Value"][0] for item in found}
        # Two series: the findings SR and the heatmap Secondary Capture (its modality is the source's).
        assert len(found) == 2 and "SR" in kinds, json.dumps(found)[:500]
        (sr_series,) = [item for item in found if item["00080060"]["Value"][0] == "SR"]
        sr_uid = sr_series["0020000E"]["Value"][0]
        (sr_id,) = [i["ID"] for i in orthanc.instances_of_series(sr_uid)]
        sr = dcmread(orthanc.download_instance(sr_id, tmp_path / "sr.dcm"))
        assert read_priority(sr) == "stat"
