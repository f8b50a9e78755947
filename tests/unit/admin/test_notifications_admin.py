"""The dashboard's notifications: listed for any user, replayed by admins only (audited), counted for
Prometheus by channel and status; no patient data on the page or in the metrics."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.models import AuditEntry, Notification, NotificationAttempt
from service.core.notifications import NotificationStatus
from service.core.status import JobStatus
from tests.unit.admin.conftest import make_job


def _notification(sessions: sessionmaker[Session], status: NotificationStatus) -> int:
    job_id = make_job(sessions, JobStatus.DONE)
    with sessions.begin() as s:
        row = Notification(
            job_id=job_id,
            rule="ptx",
            channel="ris",
            kind="hl7",
            priority="stat",
            finding={"label": "Pneumothorax", "score": 0.91},
            result_digest="d" * 64,
            status=status,
            attempts=3,
            tries=3,
            last_error="hl7_ae: test peer says AE",
        )
        s.add(row)
        s.flush()
        s.add(NotificationAttempt(notification_id=row.id, outcome=status, reason="hl7_ae"))
        return row.id


def test_list_and_page(sessions: sessionmaker[Session], viewer: TestClient) -> None:
    row_id = _notification(sessions, NotificationStatus.DEAD)
    listed = viewer.get("/api/notifications", params={"status": "dead"}).json()
    assert [(n["id"], n["status"], n["finding"], n["channel"]) for n in listed] == [
        (row_id, "dead", "Pneumothorax", "ris")
    ]
    assert viewer.get("/api/notifications", params={"status": "sent"}).json() == []
    page = viewer.get("/notifications").text
    assert "Pneumothorax" in page and "hl7_ae" in page
    assert "Doe" not in page and "PID-12345" not in page and "ACC987654" not in page
    assert viewer.post(f"/api/notifications/{row_id}/replay").status_code == 403


def test_admin_replays_a_dead_one_audited(sessions: sessionmaker[Session], admin: TestClient) -> None:
    row_id = _notification(sessions, NotificationStatus.DEAD)
    r = admin.post(f"/api/notifications/{row_id}/replay")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["tries"], r.json()["last_error"]) == ("pending", 0, None)
    assert admin.post(f"/api/notifications/{row_id}/replay").status_code == 409  # no longer dead
    assert admin.post("/api/notifications/999999/replay").status_code == 404
    with sessions() as s:
        [entry] = s.scalars(select(AuditEntry).where(AuditEntry.action == "replay_notification")).all()
        assert (entry.target_type, entry.target_id, entry.username) == ("notification", str(row_id), "alice")
        assert entry.detail == {
            "job": entry.detail["job"],
            "channel": "ris",
            "rule": "ptx",
            "previous_status": "dead",
        }


def test_metrics_by_channel_and_status(sessions: sessionmaker[Session], admin: TestClient) -> None:
    _notification(sessions, NotificationStatus.DEAD)
    _notification(sessions, NotificationStatus.SENT)
    text = admin.get("/metrics").text
    assert 'cxr_notifications{channel="ris",status="dead"} 1.0' in text
    assert 'cxr_notifications{channel="ris",status="sent"} 1.0' in text
    assert 'cxr_notifications{channel="ris",status="pending"} 0.0' in text
    assert 'cxr_notification_attempts_total{channel="ris",outcome="dead"} 1.0' in text
