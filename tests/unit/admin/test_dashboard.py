"""Pages and JSON API over a real database and the filesystem broker: lists, job page, admin actions."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.models import AuditEntry, Delivery, Job, Study, StudyPurge
from service.core.settings import Settings
from service.core.status import DeliveryStatus, JobStatus
from tests.unit.admin.conftest import ADMIN, T0, VIEWER, make_job

LABELS = [
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
]  # fmt: skip


def _result(uid: str, rejected: str) -> dict[str, Any]:
    probs = {label: round(0.05 * i, 3) for i, label in enumerate(LABELS)}
    return {
        "bundle": {"name": "cxr14_densenet121", "version": "0.0.1-test"},
        "images": [{"sop_instance_uid": uid, "probabilities": probs, "present": ["Edema", "Hernia"]}],
        "gate": {rejected: "not_frontal"},
        "inference": {"device": "cuda", "precision": "bf16", "backend": "torch", "batch_images": 12,
                      "batch_studies": 7},
    }  # fmt: skip


def _messages(settings: Settings, queue: str) -> list[Any]:
    folder = settings.broker_dir / "messages"
    return [json.loads(p.read_text()) for p in sorted(folder.glob(f"*.{queue}.msg"))]


def _write_sc(path: Path) -> None:
    rgb = np.zeros((96, 128, 3), dtype=np.uint8)
    rgb[..., 0] = 200
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    ds.Rows, ds.Columns = 96, 128
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rgb.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


@pytest.fixture
def done_job(sessions: sessionmaker[Session], settings: Settings) -> str:
    deliveries = [
        {"ae_title": "PACS", "sop_instance_uid": "9.1", "kind": "sr", "output_path": "out/sr-1.dcm",
         "status": DeliveryStatus.DELIVERED, "attempts": 1, "delivered_at": T0 + timedelta(seconds=12)},
        {"ae_title": "PACS", "sop_instance_uid": "9.2", "kind": "sc", "output_path": "out/sc-1.dcm",
         "status": DeliveryStatus.DEAD_LETTER, "attempts": 6, "last_error": "refused 0xA700",
         "history": [
             {"started_at": T0 + timedelta(seconds=11), "finished_at": T0 + timedelta(seconds=12),
              "outcome": "retrying", "error": "connection refused <b>x</b>"},
             {"started_at": T0 + timedelta(seconds=20), "finished_at": T0 + timedelta(seconds=20.5),
              "outcome": "dead_letter", "error": "refused 0xA700"},
         ]},
        {"ae_title": "EVIL", "sop_instance_uid": "9.3", "kind": "sc", "output_path": "../../etc/passwd",
         "status": DeliveryStatus.DEAD_LETTER, "attempts": 6},
    ]  # fmt: skip
    job_id = make_job(
        sessions,
        JobStatus.DONE,
        ae="CR_ROOM_1",
        patient_name="<script>alert('pn')</script>^Jane",
        patient_id="PID-12345",
        result=_result("1.2.3.4.1", "1.2.3.4.2"),
        deliveries=deliveries,
        instances=["1.2.3.4.1", "1.2.3.4.2"],
    )
    # Heatmaps are read from the job's output folder, whatever the deliveries say.
    _write_sc(settings.output_dir / job_id / "sc-1.dcm")
    (settings.output_dir / job_id / "sc-x.dcm").write_bytes(b"not numbered: never listed")
    return job_id


def test_api_lists_jobs_with_stage_times(admin: TestClient, sessions: sessionmaker[Session]) -> None:
    done = make_job(sessions, JobStatus.DONE)
    make_job(sessions, JobStatus.RUNNING)
    page = admin.get("/api/jobs").json()
    assert page["total"] == 2
    by_id = {j["id"]: j for j in page["items"]}
    stages = by_id[done]["stages"]
    assert (stages["intake_s"], stages["queue_wait_s"], stages["run_s"], stages["total_s"]) == (2, 1, 7, 10)
    assert by_id[done]["accession_masked"] == "••••••654"
    only_done = admin.get("/api/jobs", params={"status": "done"}).json()
    assert [j["id"] for j in only_done["items"]] == [done]
    assert admin.get("/api/jobs", params={"status": "bogus"}).status_code == 422
    assert admin.get(f"/api/jobs/{done}").json()["status"] == "done"
    assert admin.get("/api/jobs/nope").status_code == 404


def test_filters_and_paging(admin: TestClient, sessions: sessionmaker[Session]) -> None:
    a = make_job(sessions, JobStatus.DONE, ae="ROOM_A", received=T0)
    b = make_job(sessions, JobStatus.FAILED, ae="ROOM_B", received=T0 + timedelta(days=2))
    c = make_job(
        sessions,
        JobStatus.DONE,
        ae="ROOM_A",
        received=T0 + timedelta(days=5),
        deliveries=[{"ae_title": "PACS2", "sop_instance_uid": "1", "kind": "sr", "output_path": "x"}],
    )

    def ids(**params: Any) -> list[str]:
        return [j["id"] for j in admin.get("/api/jobs", params=params).json()["items"]]

    assert ids() == [c, b, a]
    assert ids(source_ae="ROOM_A") == [c, a]
    assert ids(destination="PACS2") == [c]
    assert ids(since="2026-01-02", until="2026-01-03") == [b]
    assert ids(until="2026-01-01") == [a]
    assert ids(limit=1, offset=1) == [b]
    # The page takes the same filters from its form (empty fields mean any) and pages.
    html = admin.get("/", params={"status": "", "since": "", "source_ae": "ROOM_A", "limit": 25}).text
    assert c[:12] in html and a[:12] in html and b[:12] not in html
    rows = admin.get("/jobs/rows", params={"status": "failed"}).text
    assert b[:12] in rows and a[:12] not in rows and "<html" not in rows
    html = admin.get("/", params={"limit": 25, "since": "garbage"}).text
    assert "page 1 of 1" in html


def test_lists_escape_and_hide_patient_data(
    admin: TestClient, viewer: TestClient, sessions: sessionmaker[Session]
) -> None:
    make_job(
        sessions, JobStatus.DONE, ae="<script>x</script>", patient_name="Doe^Jane", accession="ACC987654"
    )
    for client in (admin, viewer):
        html = client.get("/").text
        assert "<script>x</script>" not in html
        assert "&lt;script&gt;x&lt;/script&gt;" in html
        assert "Doe^Jane" not in html and "PID-12345" not in html and "ACC987654" not in html
        assert "••••••654" in html
        assert "not for diagnostic use" in html
        api = client.get("/api/jobs").text
        assert "Doe^Jane" not in api and "PID-12345" not in api and "ACC987654" not in api


def test_job_page_shows_timeline_gate_findings_heatmap_and_deliveries(
    admin: TestClient, done_job: str
) -> None:
    html = admin.get(f"/jobs/{done_job}").text
    assert "not for diagnostic use" in html
    for status in ("received", "queued", "running", "done", "delivered"):
        assert f">{status}</span>" in html
    assert "not_frontal" in html and "analysed" in html
    assert html.count('class="bar"') == 14
    assert "Pleural Thickening" in html and "Edema" in html
    assert f'src="/api/jobs/{done_job}/heatmaps/0.png"' in html
    assert "heatmaps/1.png" not in html  # the path outside the output dir is not served
    assert "refused 0xA700" in html and "Replay" in html
    assert "cuda · bf16 · torch · one pass of 12 images from 7 studies" in html
    assert (
        "2 attempts" in html and "connection refused &lt;b&gt;x&lt;/b&gt;" in html and "<b>x</b>" not in html
    )
    assert "PID-12345" not in html and "alert(" not in html
    detail = admin.get(f"/api/jobs/{done_job}").json()
    assert [i["decision"] for i in detail["images"]] == ["analysed", "not_frontal"]
    assert len(detail["images"][0]["probabilities"]) == 14
    assert detail["heatmaps"] == [f"/api/jobs/{done_job}/heatmaps/0.png"]
    assert [e["status"] for e in detail["events"]] == ["received", "queued", "running", "done"]
    history = next(
        d["history"] for d in detail["deliveries"] if d["status"] == "dead_letter" and d["history"]
    )
    assert [(a["outcome"], a["seconds"]) for a in history] == [("retrying", 1.0), ("dead_letter", 0.5)]


def test_heatmap_png_is_rendered_from_the_sc_file(admin: TestClient, anon: TestClient, done_job: str) -> None:
    r = admin.get(f"/api/jobs/{done_job}/heatmaps/0.png")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    assert img.size == (128, 96) and img.mode == "RGB" and img.getpixel((5, 5)) == (200, 0, 0)
    assert r.headers["cache-control"] == "no-store"
    assert admin.get(f"/api/jobs/{done_job}/heatmaps/1.png").status_code == 404
    assert anon.get(f"/api/jobs/{done_job}/heatmaps/0.png").status_code == 401


def test_script_in_patient_name_renders_as_text_when_revealed(
    browser: Callable[..., tuple[TestClient, str]], done_job: str, sessions: sessionmaker[Session]
) -> None:
    client, token = browser(ADMIN)
    html = client.get(f"/jobs/{done_job}").text
    assert "alert(" not in html and "PID-12345" not in html and "Reveal patient details" in html
    r = client.post(f"/jobs/{done_job}/reveal", data={"csrf_token": token})
    assert r.status_code == 200
    assert "<script>alert('pn')</script>" not in r.text
    assert "&lt;script&gt;alert(&#39;pn&#39;)&lt;/script&gt;^Jane" in r.text
    assert "PID-12345" in r.text
    assert r.headers["cache-control"] == "no-store"
    assert "PID" not in str(r.url)
    with sessions() as s:
        entry = s.scalars(select(AuditEntry)).one()
    assert (entry.username, entry.action, entry.target_id) == (ADMIN[0], "reveal_patient", done_job)


def test_viewers_never_see_patient_data(
    viewer: TestClient, browser: Callable[..., tuple[TestClient, str]], done_job: str
) -> None:
    assert viewer.get(f"/api/jobs/{done_job}/patient").status_code == 403
    client, token = browser(VIEWER)
    html = client.get(f"/jobs/{done_job}").text
    assert "Reveal patient details" not in html and "Requeue" not in html
    assert client.post(f"/jobs/{done_job}/reveal", data={"csrf_token": token}).status_code == 403


def test_patient_api_for_admins_is_audited(admin: TestClient, done_job: str) -> None:
    body = admin.get(f"/api/jobs/{done_job}/patient").json()
    assert body["patient_id"] == "PID-12345" and body["accession_number"] == "ACC987654"
    (entry,) = admin.get("/api/audit").json()["items"]
    assert entry["action"] == "reveal_patient" and "PID" not in json.dumps(entry)


def test_requeue_creates_a_queued_job_and_enqueues_it(
    admin: TestClient, viewer: TestClient, done_job: str, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    assert viewer.post(f"/api/jobs/{done_job}/requeue").status_code == 403
    r = admin.post(f"/api/jobs/{done_job}/requeue")
    assert r.status_code == 200, r.text
    new = r.json()["job"]
    assert r.json()["requeued_from"] == done_job and new["status"] == "queued" and new["id"] != done_job
    (message,) = _messages(settings, "inference")
    assert message["headers"]["task"] == "cxr.process_study"
    assert new["id"] in json.dumps(message)
    with sessions() as s:
        job = s.get(Job, new["id"])
        old = s.get(Job, done_job)
        assert job is not None and old is not None
        assert job.study_id == old.study_id and [e.status for e in job.events] == ["received", "queued"]
    entry = admin.get("/api/audit").json()["items"][0]
    assert entry["action"] == "requeue" and entry["detail"]["new_job"] == new["id"]
    assert entry["username"] == ADMIN[0]
    # Only finished jobs: the new one is queued.
    assert admin.post(f"/api/jobs/{new['id']}/requeue").status_code == 409


def test_requeue_of_a_purged_study_is_refused_until_it_is_received_again(
    admin: TestClient, done_job: str, settings: Settings, sessions: sessionmaker[Session]
) -> None:
    """Retention removed the images: a new job would only fail in the worker on missing files."""
    with sessions.begin() as s:
        job = s.get(Job, done_job)
        assert job is not None
        study_id = job.study_id
        s.add(StudyPurge(study_id=study_id, purged_at=datetime.now(UTC), files=1, bytes=10))
    r = admin.post(f"/api/jobs/{done_job}/requeue")
    assert r.status_code == 409 and "purged by retention" in r.json()["detail"]
    assert _messages(settings, "inference") == [] and admin.get("/api/audit").json()["items"] == []
    with sessions.begin() as s:  # the study arrives again from the PACS
        study = s.get(Study, study_id)
        assert study is not None
        study.last_received_at = datetime.now(UTC) + timedelta(seconds=1)
    assert admin.post(f"/api/jobs/{done_job}/requeue").status_code == 200


def test_cancel_received_or_queued_only(admin: TestClient, sessions: sessionmaker[Session]) -> None:
    queued = make_job(sessions, JobStatus.QUEUED)
    running = make_job(sessions, JobStatus.RUNNING)
    r = admin.post(f"/api/jobs/{queued}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "failed" and r.json()["reason_code"] == "cancelled"
    assert admin.post(f"/api/jobs/{running}/cancel").status_code == 409
    assert admin.post(f"/api/jobs/{queued}/cancel").status_code == 409
    assert admin.post("/api/jobs/nope/cancel").status_code == 404
    assert [e["action"] for e in admin.get("/api/audit").json()["items"]] == ["cancel"]


def test_replay_dead_letter(admin: TestClient, done_job: str, settings: Settings) -> None:
    dead = admin.get("/api/deliveries", params={"status": "dead_letter"}).json()
    assert len(dead) == 2
    delivered = admin.get("/api/deliveries", params={"status": "delivered"}).json()[0]
    assert admin.post(f"/api/deliveries/{delivered['id']}/replay").status_code == 409
    assert dead[0]["next_attempt_at"] is None  # given up: not due any more
    r = admin.post(f"/api/deliveries/{dead[0]['id']}/replay")
    assert r.status_code == 200 and r.json()["status"] == "pending" and r.json()["last_error"] is None
    assert r.json()["next_attempt_at"] is not None  # due again (now), sent at once
    (message,) = _messages(settings, "delivery")
    assert message["headers"]["task"] == "cxr.deliver"
    assert admin.get("/api/audit").json()["items"][0]["action"] == "replay"


def test_a_replay_the_broker_refuses_leaves_the_delivery_dead_and_a_requeue_received(
    admin: TestClient, done_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise ConnectionError("broker down")

    monkeypatch.setattr("service.core.deliveries.enqueue", refuse)
    monkeypatch.setattr("service.core.queue.enqueue", refuse)
    dead = admin.get("/api/deliveries", params={"status": "dead_letter"}).json()[0]
    assert admin.post(f"/api/deliveries/{dead['id']}/replay").status_code == 503
    again = next(d for d in admin.get("/api/deliveries").json() if d["id"] == dead["id"])
    assert (again["status"], again["next_attempt_at"]) == ("dead_letter", None)
    r = admin.post(f"/api/jobs/{done_job}/requeue")
    assert r.status_code == 503 and "will be queued later" in r.json()["detail"]
    statuses = [j["status"] for j in admin.get("/api/jobs").json()["items"]]
    assert sorted(statuses) == ["done", "received"]


def test_dead_letter_page_and_replay_all(
    browser: Callable[..., tuple[TestClient, str]], done_job: str, sessions: sessionmaker[Session]
) -> None:
    client, token = browser(ADMIN)
    html = client.get("/dead-letters").text
    assert "refused 0xA700" in html and "Replay all (2)" in html
    r = client.post("/dead-letters/replay-all", data={"csrf_token": token})
    assert r.status_code == 303
    assert "2 dead-lettered deliveries queued again" in client.get(r.headers["location"]).text
    with sessions() as s:
        statuses = set(s.scalars(select(Delivery.status).where(Delivery.job_id == done_job)))
    assert statuses == {"delivered", "pending"}


def test_page_actions_redirect_with_a_message(
    browser: Callable[..., tuple[TestClient, str]], sessions: sessionmaker[Session], done_job: str
) -> None:
    client, token = browser(ADMIN)
    r = client.post(f"/jobs/{done_job}/requeue", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"].startswith("/jobs/")
    new_id = r.headers["location"].rsplit("/", 1)[1]
    html = client.get(r.headers["location"]).text
    assert "Requeued as a new job" in html and 'data-live-url="/jobs/' in html and "Cancel" in html
    r = client.post(f"/jobs/{new_id}/cancel", data={"csrf_token": token})
    assert "Job cancelled." in client.get(r.headers["location"]).text
    r = client.post(f"/jobs/{new_id}/cancel", data={"csrf_token": token})
    assert "only received or queued jobs can be cancelled" in client.get(r.headers["location"]).text
    html = client.get("/audit").text
    assert html.count(">cancel</span>") == 1 and ">requeue</span>" in html


def test_health_page_and_api(admin: TestClient, settings: Settings) -> None:
    h = admin.get("/api/health").json()
    assert h["database"] is True and h["broker"] is True and h["broker_kind"] == "filesystem"
    assert h["queue_depth"] == {"inference": 0, "delivery": 0}
    assert h["disk"]["free_bytes"] > 0
    assert h["bundle"]["name"] == "cxr14_densenet121" and len(h["bundle"]["labels"]) == 14
    assert h["workers"] == []  # none has reported yet
    html = admin.get("/health").text
    assert "cxr14_densenet121" in html and "Queue depth" in html and "No worker has reported" in html


def test_health_shows_workers_from_their_heartbeats(
    admin: TestClient, sessions: sessionmaker[Session], done_job: str
) -> None:
    from datetime import UTC, datetime, timedelta

    from service.core.models import Job, Worker

    now = datetime.now(UTC)
    common = {"pid": 7, "pool": "threads", "concurrency": 16, "version": "0.1.0"}
    with sessions.begin() as s:
        s.add(Worker(name="cxr-7@gpu-<1>", queues="inference", device="cuda:0", last_seen_at=now, **common))
        s.add(
            Worker(
                name="cxr-8@gpu-2",
                queues="inference,delivery",
                device="cpu",
                last_seen_at=now - timedelta(minutes=10),
                **common,
            )
        )
        s.get(Job, done_job).worker = "cxr-7@gpu-<1>"  # type: ignore[union-attr]
    workers = {w["name"]: w for w in admin.get("/api/health").json()["workers"]}
    assert workers["cxr-7@gpu-<1>"]["state"] == "alive" and workers["cxr-8@gpu-2"]["state"] == "lost"
    assert workers["cxr-8@gpu-2"]["queues"] == ["inference", "delivery"]
    html = admin.get("/health").text
    assert "cxr-7@gpu-&lt;1&gt;" in html and "cxr-7@gpu-<1>" not in html  # escaped
    assert "1 lost (no heartbeat)" in html and "threads × 16" in html and "cuda:0" in html
    metrics = admin.get("/metrics").text
    assert 'cxr_workers{state="alive"} 1.0' in metrics and 'cxr_workers{state="lost"} 1.0' in metrics


def test_metrics(admin: TestClient, sessions: sessionmaker[Session], done_job: str) -> None:
    make_job(sessions, JobStatus.QUEUED)
    admin.post(f"/api/jobs/{done_job}/requeue")
    text = admin.get("/metrics").text
    assert 'cxr_jobs{status="done"} 1.0' in text and 'cxr_jobs{status="queued"} 2.0' in text
    assert 'cxr_deliveries{status="dead_letter"} 2.0' in text
    assert 'cxr_job_stage_seconds_bucket{le="10.0",stage="total"} 1.0' in text
    assert 'cxr_job_stage_seconds_count{stage="run"} 1.0' in text
    assert 'cxr_queue_depth{queue="inference"} 1.0' in text
    # The done job rode in a 12-image pass: counted in the 16 bucket, not the 8 one.
    assert 'cxr_inference_batch_images_bucket{le="8.0"} 0.0' in text
    assert 'cxr_inference_batch_images_bucket{le="16.0"} 1.0' in text
    assert "cxr_inference_batch_images_sum 12.0" in text
    # A job that finishes later is counted once, on the next scrape.
    make_job(sessions, JobStatus.FAILED, received=T0 + timedelta(minutes=5))
    admin.get("/metrics")
    text = admin.get("/metrics").text
    assert 'cxr_job_stage_seconds_count{stage="total"} 2.0' in text
    assert "Doe" not in text and "PID" not in text


def test_peers_page_lists_settings(admin: TestClient, settings: Settings) -> None:
    peers = admin.get("/api/peers").json()
    assert peers[0]["target"] == "listener" and peers[0]["ae_title"] == settings.listener_ae_title
    assert admin.post("/api/peers/echo", json={"target": "destination:7"}).status_code == 404
    assert "Test C-ECHO" in admin.get("/peers").text


def test_study_redirects_to_its_newest_job(admin: TestClient, sessions: sessionmaker[Session]) -> None:
    job = make_job(sessions, JobStatus.QUEUED)
    with sessions() as s:
        study_id = s.get(Job, job).study_id  # type: ignore[union-attr]
    r = admin.get(f"/studies/{study_id}")
    assert r.status_code == 303 and r.headers["location"] == f"/jobs/{job}"
    assert admin.get("/studies/9999").status_code == 404


def test_page_404_is_a_page(admin: TestClient) -> None:
    r = admin.get("/jobs/" + "f" * 32)
    assert r.status_code == 404 and "job not found" in r.text and "<html" in r.text
    assert re.search(r"not for diagnostic use", r.text)


def test_health_and_queue_depth_on_redis(
    redis_url: str, settings: Settings, sessions: sessionmaker[Session], done_job: str
) -> None:
    from service.admin.app import create_app

    on_redis = settings.model_copy(update={"broker_url": redis_url})
    with TestClient(create_app(on_redis, sessions)) as client:
        client.auth = ADMIN
        assert client.post(f"/api/jobs/{done_job}/requeue").status_code == 200
        h = client.get("/api/health").json()
        assert h["broker"] is True and h["broker_kind"] == "redis"
        assert h["queue_depth"] == {"inference": 1, "delivery": 0}
        assert 'cxr_queue_depth{queue="inference"} 1.0' in client.get("/metrics").text
        assert client.get("/readyz").json()["broker"] is True
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    with TestClient(create_app(down, sessions)) as client:
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json() == {"status": "not ready", "database": True, "broker": False}
