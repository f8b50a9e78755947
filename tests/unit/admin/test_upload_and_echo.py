"""Upload and C-ECHO against a real DICOM SCP (pynetdicom) standing in for our listener and a PACS."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import Dataset, dcmread
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from sqlalchemy.orm import Session, sessionmaker

from service.admin.app import create_app
from service.admin.uploads import UPLOAD_MARK
from service.core.models import Study
from service.core.settings import Destination, Settings
from tests.support.net import free_port
from tests.unit.admin.conftest import ADMIN, csrf_of, login


class FakeListener:
    """Stores what it receives and commits a Study row before answering, as our listener does."""

    def __init__(self, sessions: sessionmaker[Session], ae_title: str, port: int) -> None:
        self.received: list[Dataset] = []
        self.calling: list[str] = []
        self.sessions = sessions
        ae = AE(ae_title=ae_title)
        ae.supported_contexts = AllStoragePresentationContexts
        ae.add_supported_context(Verification)
        self.server = ae.start_server(
            ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        self.calling.append(event.assoc.requestor.ae_title)
        with self.sessions.begin() as s:
            s.add(Study(study_instance_uid=str(ds.StudyInstanceUID)))
        return 0x0000


@pytest.fixture
def listener(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[tuple[Settings, FakeListener]]:
    port = free_port()
    s = settings.model_copy(update={"listener_port": port, "listener_host": "0.0.0.0"})
    fake = FakeListener(sessions, s.listener_ae_title, port)
    try:
        yield s, fake
    finally:
        fake.server.shutdown()


@pytest.fixture
def client(
    listener: tuple[Settings, FakeListener], sessions: sessionmaker[Session]
) -> Iterator[tuple[TestClient, str]]:
    app: FastAPI = create_app(listener[0], sessions)
    with TestClient(app, follow_redirects=False) as c:
        yield c, login(c, ADMIN)


def _png(size: tuple[int, int] = (320, 300)) -> bytes:
    grad = np.tile(np.linspace(0, 255, size[0], dtype=np.uint8), (size[1], 1))
    out = io.BytesIO()
    Image.fromarray(grad).convert("RGB").save(out, format="PNG")
    return out.getvalue()


def test_png_upload_is_wrapped_as_a_marked_secondary_capture_in_a_new_study(
    client: tuple[TestClient, str], listener: tuple[Settings, FakeListener]
) -> None:
    c, token = client
    r = c.post("/upload", data={"csrf_token": token}, files={"file": ("chest.png", _png(), "image/png")})
    assert r.status_code == 303 and r.headers["location"].startswith("/studies/")
    (ds,) = listener[1].received
    assert listener[1].calling == [listener[0].dashboard_ae_title]
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert ds.StudyDescription == UPLOAD_MARK and UPLOAD_MARK in ds.ImageComments
    assert ds.PhotometricInterpretation == "MONOCHROME2" and (ds.Rows, ds.Columns) == (300, 320)
    assert ds.BodyPartExamined == "CHEST" and ds.Modality == "OT" and str(ds.PatientName) == ""
    assert str(ds.StudyInstanceUID).startswith(listener[0].uid_prefix)
    assert ds.pixel_array[0, -1] == 255
    # The study page waits for the job (the fake listener makes none).
    assert "Study received" in c.get(r.headers["location"]).text
    audit = c.get("/api/audit").json()["items"][0]
    assert audit["action"] == "upload" and audit["detail"]["kind"] == "image"


def test_dicom_upload_keeps_or_renews_uids(
    client: tuple[TestClient, str], listener: tuple[Settings, FakeListener], shared_dir: Path
) -> None:
    c, token = client
    source = shared_dir / "dicom" / "chest" / "cr-pa-mono1-explicit-le.dcm"
    original = dcmread(source, stop_before_pixels=True)
    data = source.read_bytes()
    c.post("/upload", data={"csrf_token": token, "fresh_uids": "true"}, files={"file": ("a.dcm", data)})
    c.post("/upload", data={"csrf_token": token}, files={"file": ("a.dcm", data)})
    renewed, kept = listener[1].received
    assert renewed.StudyInstanceUID != original.StudyInstanceUID
    assert renewed.SOPInstanceUID != original.SOPInstanceUID
    assert renewed.PatientID == original.PatientID  # only UIDs change
    assert kept.StudyInstanceUID == original.StudyInstanceUID


def test_api_upload_with_basic_auth(
    listener: tuple[Settings, FakeListener], sessions: sessionmaker[Session]
) -> None:
    with TestClient(create_app(listener[0], sessions)) as c:
        c.auth = ADMIN
        r = c.post("/api/upload", files={"file": ("x.jpg", _jpeg(), "image/jpeg")})
        assert r.status_code == 200, r.text
        assert r.json()["kind"] == "image" and r.json()["study_id"] is not None
        r = c.post("/api/upload", files={"file": ("notes.txt", b"hello, not an image")})
        assert r.status_code == 422 and "neither DICOM nor a PNG/JPEG" in r.json()["detail"]
        r = c.post("/api/upload", files={"file": ("x.gif", _gif())})
        assert r.status_code == 422 and "only PNG and JPEG" in r.json()["detail"]
    assert len(listener[1].received) == 1


def _jpeg() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((300, 300), 128, dtype=np.uint8)).save(out, format="JPEG")
    return out.getvalue()


def _gif() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(out, format="GIF")
    return out.getvalue()


def test_upload_limit(listener: tuple[Settings, FakeListener], sessions: sessionmaker[Session]) -> None:
    small = listener[0].model_copy(update={"dashboard_upload_max_bytes": 1000})
    with TestClient(create_app(small, sessions)) as c:
        c.auth = ADMIN
        noise = np.random.default_rng(0).integers(0, 255, (300, 300), dtype=np.uint8)
        out = io.BytesIO()
        Image.fromarray(noise).save(out, format="PNG")
        r = c.post("/api/upload", files={"file": ("chest.png", out.getvalue())})
        assert r.status_code == 413


def test_upload_when_the_listener_is_down(settings: Settings, sessions: sessionmaker[Session]) -> None:
    down = settings.model_copy(update={"listener_port": free_port()})
    with TestClient(create_app(down, sessions)) as c:
        c.auth = ADMIN
        r = c.post("/api/upload", files={"file": ("chest.png", _png())})
        assert r.status_code == 502


def test_echo_listener_and_destinations(
    listener: tuple[Settings, FakeListener],
    sessions: sessionmaker[Session],
    browser: Callable[..., tuple[TestClient, str]],
) -> None:
    closed = free_port()
    s = listener[0].model_copy(
        update={
            "destinations": [
                Destination(ae_title="UP", host="127.0.0.1", port=listener[0].listener_port),
                Destination(ae_title="DOWN", host="127.0.0.1", port=closed),
            ]
        }
    )
    with TestClient(create_app(s, sessions), follow_redirects=False) as c:
        c.auth = ADMIN
        ok = c.post("/api/peers/echo", json={"target": "listener"}).json()
        assert ok["ok"] is True and ok["detail"] == "C-ECHO succeeded"
        down = c.post("/api/peers/echo", json={"target": "destination:1"}).json()
        assert down["ok"] is False
        c.auth = None  # type: ignore[assignment]
        token = login(c, ADMIN)
        r = c.post("/peers/echo", data={"csrf_token": token, "target": "destination:0"})
        assert r.status_code == 303
        html = c.get("/peers").text
        assert "C-ECHO succeeded" in html and csrf_of(html) == token
