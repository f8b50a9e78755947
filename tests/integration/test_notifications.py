"""Urgent-finding notifications against real peers started here: an MLLP listener (hl7apy parses each
message with strict v2.5 validation and answers AA, AE, AR or nothing) and HTTP receivers (a FHIR server
answering 201, 500 then 201, or 422 with an OperationOutcome; a webhook receiver checking the HMAC).

The first tests drive the plain functions a worker runs (service.notify.attempt) on SQLite rows; the last
one runs the whole gateway: a C-STORE'd chest film, the worker's result, the rows, the listener's
scheduler, the worker's ``cxr.notify`` task, the peers' answers, the dashboard's list.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.models import Notification, NotificationAttempt
from service.core.notifications import OPEN, NotificationStatus
from service.core.settings import Settings
from service.notify import webhook
from service.notify.attempt import attempt
from service.notify.rules import create_for_job
from tests.support.http_receiver import HttpReceiver
from tests.support.mllp import MllpListener
from tests.unit.notify.conftest import FINISHED, database, done_job, make_settings

S = NotificationStatus


def _settings(tmp_path: Path, channel: dict[str, Any], **overrides: Any) -> Settings:
    return make_settings(tmp_path, notify_channels=[channel], **overrides)


def _rows(settings: Settings) -> tuple[sessionmaker[Session], int]:
    sessions = database(settings)
    job_id = done_job(sessions)
    with sessions.begin() as s:
        [row_id] = create_for_job(s, job_id, settings, FINISHED)
    return sessions, row_id


def _run_until_final(
    settings: Settings, sessions: sessionmaker[Session], row_id: int, limit: int = 10
) -> list[S]:
    """What the worker's task does each time the row is due (no backoff wait: base 0 s)."""
    seen: list[S] = []
    for _ in range(limit):
        status = attempt(row_id, settings, sessions)
        assert status is not None
        seen.append(status)
        if status not in OPEN:
            break
    return seen


def _row(sessions: sessionmaker[Session], row_id: int) -> Notification:
    with sessions() as s:
        row = s.get(Notification, row_id)
        assert row is not None
        s.expunge(row)
        return row


def _hl7(port: int, timeout: float = 5.0) -> dict[str, Any]:
    return {"type": "hl7", "name": "ris", "host": "127.0.0.1", "port": port, "timeout_seconds": timeout}


def test_hl7_aa_is_sent_once_and_parses_as_v25(tmp_path: Path) -> None:
    with MllpListener(["AA"]) as peer:
        settings = _settings(tmp_path, _hl7(peer.port))
        sessions, row_id = _rows(settings)
        started = time.monotonic()
        assert _run_until_final(settings, sessions, row_id) == [S.SENT]
        elapsed = time.monotonic() - started
    assert peer.errors == []
    [received] = peer.received
    order = received.message.oru_r01_patient_result.oru_r01_order_observation
    assert order.obr.obr_18.value == "ACC1"
    assert order.obr.obr_27.obr_27_6.value == "S"
    assert received.message.msh.msh_10.value == f"CXR{row_id}"
    row = _row(sessions, row_id)
    assert (row.status, row.attempts, row.last_error) == (S.SENT, 1, None)
    print(f"hl7 send + ACK: {elapsed * 1000:.1f} ms")
    # A second message for the same attempt (a doubled broker message) sends nothing.
    assert attempt(row_id, settings, sessions, 0) is None


def test_hl7_ae_is_retried_then_dead(tmp_path: Path) -> None:
    with MllpListener(["AE"]) as peer:
        settings = _settings(tmp_path, _hl7(peer.port), notify_max_retries=2)
        sessions, row_id = _rows(settings)
        assert _run_until_final(settings, sessions, row_id) == [S.FAILED_RETRYING, S.FAILED_RETRYING, S.DEAD]
    assert len(peer.received) == 3
    row = _row(sessions, row_id)
    assert row.status == S.DEAD
    assert row.last_error is not None and row.last_error.startswith("hl7_ae")
    assert [a.reason for a in row.history] == ["hl7_ae"] * 3


def test_hl7_ae_then_aa_recovers(tmp_path: Path) -> None:
    with MllpListener(["AE", "AA"]) as peer:
        settings = _settings(tmp_path, _hl7(peer.port))
        sessions, row_id = _rows(settings)
        assert _run_until_final(settings, sessions, row_id) == [S.FAILED_RETRYING, S.SENT]
    # The retry is the same message: the same control id lets the RIS drop a duplicate.
    assert {r.message.msh.msh_10.value for r in peer.received} == {f"CXR{row_id}"}


def test_hl7_ar_is_dead_at_once(tmp_path: Path) -> None:
    with MllpListener(["AR"]) as peer:
        settings = _settings(tmp_path, _hl7(peer.port))
        sessions, row_id = _rows(settings)
        assert _run_until_final(settings, sessions, row_id) == [S.DEAD]
    assert "test peer says AR" in (_row(sessions, row_id).last_error or "")


def test_hl7_peer_that_never_acks_times_out_and_is_retried(tmp_path: Path) -> None:
    with MllpListener(["none", "AA"]) as peer:
        settings = _settings(tmp_path, _hl7(peer.port, timeout=1.0))
        sessions, row_id = _rows(settings)
        started = time.monotonic()
        assert attempt(row_id, settings, sessions) == S.FAILED_RETRYING
        waited = time.monotonic() - started
        assert 0.9 <= waited < 3.0
        assert _row(sessions, row_id).last_error == "hl7_no_ack: no ACK within the time-out"
        assert attempt(row_id, settings, sessions) == S.SENT


def test_hl7_peer_down_is_retried(tmp_path: Path) -> None:
    from tests.support.net import free_port

    settings = _settings(tmp_path, _hl7(free_port()))
    sessions, row_id = _rows(settings)
    assert attempt(row_id, settings, sessions) == S.FAILED_RETRYING
    assert (_row(sessions, row_id).last_error or "").startswith("hl7_unreachable")


def _verifier(secret: bytes) -> Callable[[dict[str, str], bytes], bool]:
    """What a webhook receiver checks: the HMAC over timestamp and body, and a recent timestamp."""

    def check(headers: dict[str, str], body: bytes) -> bool:
        timestamp = headers[webhook.TIMESTAMP_HEADER.lower()]
        given = headers[webhook.SIGNATURE_HEADER.lower()]
        return webhook.verify(secret, timestamp, body, given, datetime.now(UTC))

    return check


def _fhir(url: str) -> dict[str, Any]:
    return {"type": "fhir", "name": "ehr", "url": url + "/fhir", "timeout_seconds": 5}


def test_fhir_500_then_201_is_retried_and_sent(tmp_path: Path) -> None:
    from fhirclient.models.bundle import Bundle

    with HttpReceiver([500, 201]) as server:
        settings = _settings(tmp_path, _fhir(server.url))
        sessions, row_id = _rows(settings)
        assert _run_until_final(settings, sessions, row_id) == [S.FAILED_RETRYING, S.SENT]
    assert [r.path for r in server.requests] == ["/fhir", "/fhir"]
    assert server.requests[0].headers["content-type"] == "application/fhir+json"
    # What the server got parses with the R4 models, and the retry is the same transaction.
    bundle = Bundle(json.loads(server.requests[1].body), strict=True)
    assert [e.resource.resource_type for e in bundle.entry] == ["DiagnosticReport", "Observation"]
    assert (
        server.requests[0].body == server.requests[1].body
        or json.loads(server.requests[0].body)["entry"][0]["fullUrl"]
        == json.loads(server.requests[1].body)["entry"][0]["fullUrl"]
    )
    row = _row(sessions, row_id)
    assert [a.reason for a in row.history] == ["fhir_500", "fhir_201"]


def test_fhir_422_is_dead_with_the_operation_outcome(tmp_path: Path) -> None:
    with HttpReceiver([422]) as server:
        settings = _settings(tmp_path, _fhir(server.url))
        sessions, row_id = _rows(settings)
        assert _run_until_final(settings, sessions, row_id) == [S.DEAD]
    assert _row(sessions, row_id).last_error == "fhir_422: error processing: Unknown subject identifier"


def test_webhook_is_signed_and_verified_by_the_receiver(tmp_path: Path) -> None:
    secret = tmp_path / "hook-secret"
    secret.write_text("a-long-shared-secret\n")

    check = _verifier(b"a-long-shared-secret")
    with HttpReceiver([200], verify=check) as server:
        channel = {
            "type": "webhook",
            "name": "oncall",
            "url": server.url + "/hook",
            "secret_file": str(secret),
        }
        settings = _settings(tmp_path, channel)
        sessions, row_id = _rows(settings)
        assert _run_until_final(settings, sessions, row_id) == [S.SENT]
        # The wrong secret: the receiver refuses (401), a configuration error, dead at once.
        secret.write_text("rotated-on-one-side-only")
        (tmp_path / "b").mkdir()
        sessions2, row2 = _rows(_settings(tmp_path / "b", channel))
        assert _run_until_final(settings, sessions2, row2) == [S.DEAD]
    assert [r.verified for r in server.requests] == [True, False]
    payload = json.loads(server.requests[0].body)
    assert payload["finding"]["label"] == "Pneumothorax"
    assert payload["priority"] == "stat"


def test_a_rerun_with_the_same_result_notifies_nobody_again(tmp_path: Path) -> None:
    with MllpListener(["AA"]) as peer:
        settings = _settings(tmp_path, _hl7(peer.port))
        sessions, row_id = _rows(settings)
        assert _run_until_final(settings, sessions, row_id) == [S.SENT]
        with sessions.begin() as s:
            job_id = s.get(Notification, row_id).job_id  # type: ignore[union-attr]
            assert create_for_job(s, job_id, settings) == []
    assert len(peer.received) == 1
    with sessions() as s:
        assert (
            s.scalar(select(NotificationAttempt.id).where(NotificationAttempt.notification_id != row_id))
            is None
        )


pytestmark = pytest.mark.timeout(120)


def test_the_whole_path_from_a_cstore_to_every_channel(tmp_path: Path, shared_dir: Path) -> None:
    """A chest film C-STORE'd to the running gateway (``serve``: listener, worker, dashboard): the worker's
    result fires the rule, the rows are written with it, the listener's scheduler sends them by name, the
    worker's task sends each on its channel; the RIS ACKs, the FHIR server fails once then takes it, the
    webhook receiver verifies the signature; the dashboard lists all three sent, /metrics counts them."""
    import httpx
    from pydicom import dcmread

    from tests.support.dcmtk import storescu
    from tests.support.gateway import GatewayProcesses

    secret = tmp_path / "hook-secret"
    secret.write_text("whole-path-secret")
    source = shared_dir / "dicom" / "chest" / "cr-pa-mono1-explicit-le.dcm"

    check = _verifier(b"whole-path-secret")
    with (
        MllpListener(["AA"]) as ris,
        HttpReceiver([500, 201]) as ehr,
        HttpReceiver([200], verify=check) as hook,
    ):
        channels = [
            _hl7(ris.port),
            _fhir(ehr.url),
            {"type": "webhook", "name": "oncall", "url": hook.url + "/hook", "secret_file": str(secret)},
        ]
        # min_score 0: the rule fires on any analysed film, whatever the model scores.
        rules = [{"name": "ptx", "finding": "Pneumothorax", "min_score": 0.0, "priority": "stat"}]
        env = {
            "CXR_NOTIFY_RULES": json.dumps(rules),
            "CXR_NOTIFY_CHANNELS": json.dumps(channels),
            "CXR_NOTIFY_RETRY_BASE_SECONDS": "1",
        }
        with GatewayProcesses(tmp_path / "gw", commands=("serve",), env=env) as gw:
            try:
                sent = storescu("127.0.0.1", gw.listener_port, [source], called_aet=gw.ae_title)
                assert sent.returncode == 0, sent.stdout + sent.stderr
                deadline = time.monotonic() + 240
                rows: list[dict[str, Any]] = []
                while time.monotonic() < deadline:
                    rows = gw.api("/api/notifications")
                    if len(rows) == 3 and all(r["status"] == "sent" for r in rows):
                        break
                    time.sleep(0.5)
                assert sorted((r["channel"], r["status"]) for r in rows) == [
                    ("ehr", "sent"),
                    ("oncall", "sent"),
                    ("ris", "sent"),
                ], rows
                [job] = gw.api("/api/jobs")["items"]
                metrics = httpx.get(f"{gw.dashboard_url}/metrics", auth=gw.admin, timeout=10).text
            except BaseException:
                print(gw.log_tail(200))
                raise
    by_channel = {r["channel"]: r for r in rows}
    assert by_channel["ehr"]["attempts"] == 2  # 500, then 201
    assert by_channel["ris"]["attempts"] == by_channel["oncall"]["attempts"] == 1
    [message] = ris.received
    assert ris.errors == []
    order = message.message.oru_r01_patient_result.oru_r01_order_observation
    src = dcmread(source, stop_before_pixels=True)
    assert order.obr.obr_18.value == str(src.AccessionNumber)
    assert order.oru_r01_observation[3].obx.obx_5.value == src.StudyInstanceUID
    assert [r.verified for r in hook.requests] == [True]
    assert json.loads(hook.requests[0].body)["job_id"] == job["id"]
    assert 'cxr_notifications{channel="ris",status="sent"} 1.0' in metrics
    assert 'cxr_notification_attempts_total{channel="ehr",outcome="failed_retrying"} 1.0' in metrics
    finished = datetime.fromisoformat(job["stages"]["finished_at"])
    latency = {r["channel"]: (datetime.fromisoformat(r["sent_at"]) - finished).total_seconds() for r in rows}
    print(f"result -> sent latency (s): {latency}")
