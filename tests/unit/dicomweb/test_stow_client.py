"""STOW-RS client: what each answer of an archive means for a delivery, against a real HTTP server
started here (http.server) answering as a STOW-RS server would."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from service.core.errors import PermanentError, TransientError
from service.dicomweb.config import DicomwebDestination
from service.dicomweb.stow import FailureReason, StoreReport, sop_item
from service.dicomweb.stow_client import Reply, judge, stow_file
from tests.support.net import free_port

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"
UID = "1.2.3.4"


def _body(stored: tuple[str, ...] = (), failed: dict[str, int] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if stored:
        body["00081199"] = {"vr": "SQ", "Value": [sop_item("1.2.840.10008.5.1.4.1.1.7", u) for u in stored]}
    if failed:
        body["00081198"] = {
            "vr": "SQ",
            "Value": [sop_item("1.2.840.10008.5.1.4.1.1.7", u, failure=r) for u, r in failed.items()],
        }
    return body


@pytest.mark.parametrize(
    ("status", "failed", "outcome"),
    [
        (200, None, None),
        (202, None, None),  # accepted with warnings: stored
        (202, {UID: FailureReason.OUT_OF_RESOURCES}, TransientError),
        (202, {UID: FailureReason.PROCESSING_FAILURE}, TransientError),
        (202, {UID: FailureReason.SOP_CLASS_MISMATCH}, PermanentError),
        (202, {UID: FailureReason.CANNOT_UNDERSTAND}, PermanentError),
        (202, {"9.9": FailureReason.CANNOT_UNDERSTAND}, None),  # another instance of the request failed
        (409, {UID: FailureReason.CANNOT_UNDERSTAND}, PermanentError),
        (409, None, PermanentError),
        (400, None, PermanentError),
        (401, None, PermanentError),
        (403, None, PermanentError),
        (404, None, PermanentError),
        (500, None, TransientError),
        (503, None, TransientError),
        (429, None, TransientError),
        (0, None, TransientError),
    ],
)
def test_judge(status: int, failed: dict[str, int] | None, outcome: type[Exception] | None) -> None:
    reply = Reply(status, StoreReport.from_json(_body(failed=failed)), "ConnectionRefusedError")
    if outcome is None:
        judge(reply, UID)
    else:
        with pytest.raises(outcome):
            judge(reply, UID)


def test_unauthorised_says_so() -> None:
    with pytest.raises(PermanentError, match="not authorised"):
        judge(Reply(401, StoreReport()), UID)


def test_report_reads_both_sequences_and_ignores_garbage() -> None:
    report = StoreReport.from_json(_body(stored=("1.1",), failed={"2.2": 0xA700}))
    assert report.stored == {"1.1": None} and report.failed == {"2.2": 0xA700}
    assert StoreReport.from_json([_body(stored=("1.1",))]).stored == {"1.1": None}
    for junk in ("text", 3, None, {"00081199": "x"}, {"00081198": {"Value": ["x"]}}):
        assert StoreReport.from_json(junk) == StoreReport()
    # A failed item without a UID (a part the server could not read) still counts, by its reason.
    assert StoreReport.from_json({"00081198": {"Value": [{}]}}).unnamed == [0xC000]


class _Archive(BaseHTTPRequestHandler):
    """Answers every POST with the server's ``answer`` (status, body) and keeps what it received."""

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        self.server.seen.append((self.path, dict(self.headers), self.rfile.read(length)))  # type: ignore[attr-defined]
        status, body = self.server.answer  # type: ignore[attr-defined]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/dicom+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def archive() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _Archive)
    server.seen = []  # type: ignore[attr-defined]
    server.answer = (200, {})  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def _dest(server: ThreadingHTTPServer, tmp_path: Path, **auth: Any) -> DicomwebDestination:
    return DicomwebDestination(
        type="dicomweb", name="ARCHIVE", url=f"http://127.0.0.1:{server.server_port}/dw/", **auth
    )


def test_stow_file_posts_multipart_related_with_bearer_token(
    archive: ThreadingHTTPServer, tmp_path: Path, shared_dir: Path
) -> None:
    token = tmp_path / "token"
    token.write_text("s3cret\n")
    dest = _dest(archive, tmp_path, auth={"type": "bearer", "token_file": token})
    uid = str(dcmread(shared_dir / CR, stop_before_pixels=True).SOPInstanceUID)
    archive.answer = (200, _body(stored=(uid,)))  # type: ignore[attr-defined]
    stow_file(dest, shared_dir / CR)
    ((path, headers, body),) = archive.seen  # type: ignore[attr-defined]
    assert path == "/dw/studies"
    assert headers["Authorization"] == "Bearer s3cret"
    kind = headers["Content-Type"]
    assert kind.startswith("multipart/related;") and 'type="application/dicom"' in kind
    boundary = kind.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode())
    assert body.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert (shared_dir / CR).read_bytes() in body


def test_stow_file_partial_failure_of_our_instance_is_classified(
    archive: ThreadingHTTPServer, tmp_path: Path, shared_dir: Path
) -> None:
    uid = str(dcmread(shared_dir / CR, stop_before_pixels=True).SOPInstanceUID)
    dest = _dest(archive, tmp_path)
    archive.answer = (202, _body(failed={uid: 0xA700}))  # type: ignore[attr-defined]
    with pytest.raises(TransientError, match="0xA700"):
        stow_file(dest, shared_dir / CR)
    archive.answer = (202, _body(failed={uid: 0xA900}))  # type: ignore[attr-defined]
    with pytest.raises(PermanentError, match="0xA900"):
        stow_file(dest, shared_dir / CR)


def test_unreadable_credentials_retry_and_nothing_is_sent(
    archive: ThreadingHTTPServer, tmp_path: Path, shared_dir: Path
) -> None:
    dest = _dest(
        archive, tmp_path, auth={"type": "basic", "username": "u", "password_file": tmp_path / "absent"}
    )
    with pytest.raises(TransientError, match="credentials unreadable"):
        stow_file(dest, shared_dir / CR)
    assert archive.seen == []  # type: ignore[attr-defined]


def test_nobody_listening_is_transient(tmp_path: Path, shared_dir: Path) -> None:
    dest = DicomwebDestination(type="dicomweb", name="DOWN", url=f"http://127.0.0.1:{free_port()}/dw")
    with pytest.raises(TransientError, match="no answer"):
        stow_file(dest, shared_dir / CR)
