"""The site loop through the dashboard's HTTP surface: reader feedback (API and form), label imports all
or nothing with line numbers, who may write what, validation and retention pages."""

from __future__ import annotations

from collections.abc import Callable

from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from service.core.models import AuditEntry, FindingFeedback, Job, LabelImport, ReferenceLabel, StudyPurge
from service.site.findings import ModelFindings
from tests.unit.admin.test_route_security import PUBLIC, routes
from tests.unit.site.conftest import READER, seed_job

REVIEW_WRITES = {
    ("POST", "/api/jobs/{job_id}/feedback"),
    ("POST", "/jobs/{job_id}/feedback"),
    ("POST", "/api/labels"),
    ("POST", "/labels"),
    ("POST", "/logout"),
}


def _scores(model: ModelFindings, high: set[str]) -> dict[str, float]:
    return {f: 0.9 if f in high else 0.001 for f in model.labels}


def test_reader_feedback_round_trips_through_the_api(
    sessions: sessionmaker[Session], model: ModelFindings, reader: TestClient, viewer: TestClient
) -> None:
    job_id, _ = seed_job(sessions, _scores(model, {"Effusion"}), model.operating_points)
    body = {
        "verdicts": [{"finding": "Effusion", "verdict": "agree"}, {"finding": "Mass", "verdict": "missed"}]
    }
    assert viewer.post(f"/api/jobs/{job_id}/feedback", json=body).status_code == 403
    r = reader.post(f"/api/jobs/{job_id}/feedback", json=body)
    assert r.status_code == 200, r.text
    got = {f["finding"]: f for f in reader.get(f"/api/jobs/{job_id}/feedback").json()}
    assert got["Effusion"]["verdict"] == "agree" and got["Effusion"]["model_present"] is True
    assert got["Mass"]["verdict"] == "missed" and got["Mass"]["model_present"] is False
    assert got["Mass"]["username"] == READER[0]
    # A changed mind replaces the reader's verdict; both moves are in the audit log.
    reader.post(
        f"/api/jobs/{job_id}/feedback", json={"verdicts": [{"finding": "Effusion", "verdict": "disagree"}]}
    )
    with sessions() as s:
        rows = s.scalars(select(FindingFeedback).where(FindingFeedback.finding == "Effusion")).all()
        assert [r.verdict for r in rows] == ["disagree"]
        audit = s.scalars(select(AuditEntry).where(AuditEntry.action == "finding_feedback")).all()
        assert len(audit) == 3 and {a.username for a in audit} == {READER[0]}
        assert audit[-1].detail == {"finding": "Effusion", "verdict": "disagree"}
    # Refused whole: a 'missed' on a finding the model called present, alongside a good verdict.
    bad = {
        "verdicts": [{"finding": "Hernia", "verdict": "agree"}, {"finding": "Effusion", "verdict": "missed"}]
    }
    assert reader.post(f"/api/jobs/{job_id}/feedback", json=bad).status_code == 422
    unknown = {"verdicts": [{"finding": "Fracture", "verdict": "agree"}]}
    assert reader.post(f"/api/jobs/{job_id}/feedback", json=unknown).status_code == 422
    with sessions() as s:
        assert s.scalar(select(func.count()).where(FindingFeedback.finding == "Hernia")) == 0


def test_reader_feedback_through_the_job_page_form(
    sessions: sessionmaker[Session],
    model: ModelFindings,
    browser: Callable[[tuple[str, str]], tuple[TestClient, str]],
) -> None:
    job_id, _ = seed_job(sessions, _scores(model, {"Cardiomegaly"}), model.operating_points)
    client, token = browser(READER)
    page = client.get(f"/jobs/{job_id}")
    assert 'id="feedback-form"' in page.text and "Reveal patient details" not in page.text
    form = {
        "csrf_token": token,
        "verdict:Cardiomegaly": "disagree",
        "verdict:Edema": "unsure",
        "missed": "Nodule",
    }
    r = client.post(f"/jobs/{job_id}/feedback", data=form)
    assert r.status_code == 303
    page = client.get(f"/jobs/{job_id}").text
    assert "Feedback recorded on 3 findings" in page
    assert 'value="disagree" aria-label="disagree Cardiomegaly" checked' in page
    with sessions() as s:
        got = {r.finding: r.verdict for r in s.scalars(select(FindingFeedback))}
    assert got == {"Cardiomegaly": "disagree", "Edema": "unsure", "Nodule": "missed"}


def test_a_reader_writes_only_feedback_and_labels(app: FastAPI, reader: TestClient) -> None:
    seen = set()
    for method, template, path in routes(app):
        if (method, template) in PUBLIC or method == "GET":
            continue
        status = reader.request(method, path).status_code
        if (method, template) in REVIEW_WRITES:
            seen.add((method, template))
            assert status != 403, (method, path, status)
        else:
            assert status == 403, (method, path, status)  # thresholds, bundles, requeue, replay, upload …
    assert seen == REVIEW_WRITES
    assert reader.get("/api/jobs/" + "0" * 32 + "/patient").status_code == 403


def _csv(*lines: str) -> bytes:
    return "\n".join(lines).encode()


def test_label_import_is_all_or_nothing_with_line_numbers(
    sessions: sessionmaker[Session], model: ModelFindings, reader: TestClient, viewer: TestClient
) -> None:
    points = model.operating_points
    _, uid_a = seed_job(sessions, _scores(model, set()), points, accession="ACC-A")
    seed_job(sessions, _scores(model, set()), points, accession="ACC-B")
    bad = _csv(
        "StudyInstanceUID,AccessionNumber,Findings",
        f"{uid_a},,Effusion|pleural thickening",
        "9.9.9.9,,Mass",  # line 3: unknown study
        ",ACC-B,Effusion|Fracture",  # line 4: unknown finding
        f"{uid_a},,No Finding",  # line 5: duplicate of line 2
        ",ACC-B,No Finding|Mass",  # line 6: contradiction (and the same study as line 4)
    )
    r = reader.post("/api/labels", files={"file": ("ris.csv", bad, "text/csv")})
    assert r.status_code == 422
    problems = [(p["line"], p["message"]) for p in r.json()["problems"]]
    assert [line for line, _ in problems] == [3, 4, 5, 6, 6]
    assert "unknown study" in problems[0][1] and "unknown finding 'Fracture'" in problems[1][1]
    assert "line 2" in problems[2][1] and "No Finding" in problems[3][1] and "line 4" in problems[4][1]
    with sessions() as s:
        assert s.scalar(select(func.count()).select_from(ReferenceLabel)) == 0
        assert s.scalar(select(func.count()).select_from(LabelImport)) == 0
    good = _csv(
        "StudyInstanceUID,AccessionNumber,Findings",
        f"{uid_a},,Effusion|pleural thickening",
        ",ACC-B,No Finding",
    )
    assert viewer.post("/api/labels", files={"file": ("ris.csv", good, "text/csv")}).status_code == 403
    r = reader.post("/api/labels", files={"file": ("ris.csv", good, "text/csv")})
    assert r.status_code == 201 and r.json()["studies"] == 2
    with sessions() as s:
        present = s.scalars(select(ReferenceLabel.finding).where(ReferenceLabel.present)).all()
        assert sorted(present) == ["Effusion", "Pleural_Thickening"]
        assert s.scalar(select(func.count()).select_from(ReferenceLabel)) == 2 * len(model.labels)
        entry = s.scalar(select(AuditEntry).where(AuditEntry.action == "label_import"))
        assert entry is not None and entry.username == READER[0] and entry.detail["studies"] == 2


def test_labels_page_shows_the_refused_lines(
    sessions: sessionmaker[Session], browser: Callable[[tuple[str, str]], tuple[TestClient, str]]
) -> None:
    client, token = browser(READER)
    bad = _csv("AccessionNumber,Findings", "NOPE,Mass", "", "ALSO-NOPE,Edema")
    r = client.post("/labels", data={"csrf_token": token}, files={"file": ("x.csv", bad, "text/csv")})
    assert r.status_code == 422
    assert "line 2: unknown study (AccessionNumber)" in r.text and "line 4: unknown study" in r.text
    assert "nothing imported" in r.text


def test_validation_and_retention_pages(
    sessions: sessionmaker[Session], model: ModelFindings, viewer: TestClient, reader: TestClient
) -> None:
    points = model.operating_points
    uids = [seed_job(sessions, _scores(model, {"Effusion"} if n % 2 else set()), points)[1] for n in range(6)]
    csv = _csv(
        "StudyInstanceUID,Findings",
        *(f"{u},{'Effusion' if n % 3 else 'No Finding'}" for n, u in enumerate(uids)),
    )
    assert reader.post("/api/labels", files={"file": ("l.csv", csv, "text/csv")}).status_code == 201
    data = viewer.get("/api/validation").json()
    eff = next(f for f in data["findings"] if f["finding"] == "Effusion")
    assert data["studies"] == 6 and eff["positives"] == 4 and eff["sensitivity"]["k"] == 2
    page = viewer.get("/validation")
    assert page.status_code == 200 and 'id="roc-chart"' in page.text and "agree = the model" in page.text
    report = viewer.get("/validation/report.html")
    assert report.headers["content-disposition"].startswith("attachment")
    assert "data:image/png;base64," in report.text and "not for diagnostic use" in report.text
    assert viewer.get("/validation?since=2020-13-01").status_code == 422
    retention = viewer.get("/api/retention").json()
    assert [b["label"] for b in retention["disk"]["spool"]] == ["< 1 d", "1–7 d", "7–30 d", "> 30 d"]
    assert viewer.get("/retention").status_code == 200


def test_a_purged_job_says_so_instead_of_broken_images(
    sessions: sessionmaker[Session], model: ModelFindings, viewer: TestClient
) -> None:
    job_id, _ = seed_job(sessions, _scores(model, {"Mass"}), model.operating_points)
    assert 'id="source-0"' in viewer.get(f"/jobs/{job_id}").text
    with sessions.begin() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.finished_at is not None
        s.add(StudyPurge(study_id=job.study_id, purged_at=job.finished_at, files=2, bytes=10))
    page = viewer.get(f"/jobs/{job_id}").text
    assert 'id="purged-0"' in page and 'id="source-0"' not in page
