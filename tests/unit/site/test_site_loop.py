"""Site operating points, the bundle registry's routes, drift and the shadow banner through the dashboard;
the population stability index against a hand computation."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.admin.app import create_app
from service.core.db import make_session_factory, migrate
from service.core.models import AuditEntry, Job, OperatingPointSet
from service.core.settings import Destination, load_settings
from service.core.status import Mode
from service.site.drift import Reference, Week, bin_fractions, compare, psi
from service.site.findings import ModelFindings
from tests.unit.admin.conftest import VIEWER
from tests.unit.site.conftest import USERS, seed_job


def test_psi_matches_a_hand_computation() -> None:
    expected = [0.25, 0.25, 0.5]
    actual = [0.5, 0.25, 0.25]
    # (0.5-0.25)·ln(0.5/0.25) + 0 + (0.25-0.5)·ln(0.25/0.5) = 0.25·ln2 + 0.25·ln2 = 0.5·ln 2
    assert psi(expected, actual) == pytest.approx(0.5 * math.log(2), abs=1e-12)
    assert psi(expected, expected) == 0.0
    # An empty bin counts as the floor (1e-4), not as impossible.
    floor = (1e-4 - 0.5) * math.log(1e-4 / 0.5) + (0.5 - 0.5) * 0 + (0.5 - 1e-4) * math.log(0.5 / 1e-4)
    assert psi([0.5, 0.5, 0.0], [0.0, 0.5, 0.5]) == pytest.approx(floor, rel=1e-12)
    # Bins: first and last open-ended, a value on an edge in the upper bin.
    assert bin_fractions([-1.0, 0.2, 0.5, 0.7, 2.0], [0.0, 0.5, 1.0]) == [0.4, 0.6]


def test_weekly_drift_against_a_reference() -> None:
    ref = Reference(
        "hand", {"score:Effusion": ([0.0, 0.5, 1.0], [0.5, 0.5])}, {"view": {"PA": 0.8, "AP": 0.2}}
    )
    week = Week(datetime(2026, 11, 23, tzinfo=UTC))
    for score, view in [(0.9, "AP"), (0.8, "AP"), (0.1, "PA"), (0.7, "AP")]:
        week.add_result(
            {
                "gate": {"1": None},
                "images": [
                    {
                        "probabilities": {"Effusion": score},
                        "rows": 10,
                        "columns": 20,
                        "inputs": {"view": view},
                    }
                ],
            }
        )
    items = {i.item: i for i in compare(week, ref, warn_at=0.2).items}
    score_psi = (0.25 - 0.5) * math.log(0.25 / 0.5) + (0.75 - 0.5) * math.log(0.75 / 0.5)
    assert items["score:Effusion"].psi == pytest.approx(score_psi)
    view_psi = (0.75 - 0.2) * math.log(0.75 / 0.2) + (0.25 - 0.8) * math.log(0.25 / 0.8)
    assert items["view"].psi == pytest.approx(view_psi) and items["view"].warn
    assert items["manufacturer"].psi is None  # no reference for it
    assert items["gate"].observed == {"accepted": 1.0}


def _labelled(
    sessions: sessionmaker[Session], admin: TestClient, model: ModelFindings, n: int = 12
) -> list[float]:
    """n studies with Effusion scores i/n, present on the upper half; returns the scores."""
    scores = []
    rows = ["StudyInstanceUID,Findings"]
    for i in range(n):
        score = (i + 0.5) / n
        scores.append(score)
        others = dict.fromkeys(model.labels, 0.001)
        _, uid = seed_job(
            sessions,
            {**others, "Effusion": score},
            model.operating_points,
            patient_id=f"P{i}",
            accession=f"A{i}",
            version=model.version or "",
        )
        rows.append(f"{uid},{'Effusion' if i >= n // 2 else 'No Finding'}")
    r = admin.post("/api/labels", files={"file": ("l.csv", "\n".join(rows).encode(), "text/csv")})
    assert r.status_code == 201, r.text
    return scores


def test_thresholds_by_value_and_by_sensitivity_versioned_audited_reverted(
    sessions: sessionmaker[Session], model: ModelFindings, admin: TestClient, reader: TestClient
) -> None:
    _labelled(sessions, admin, model)
    shipped = model.operating_points["Effusion"]
    for client in (reader,):
        assert client.post("/api/operating-points", json={"thresholds": {"Effusion": 0.3}}).status_code == 403
        assert client.post("/api/operating-points/revert", json={}).status_code == 403
        assert client.post("/api/bundles", json={"path": "/tmp"}).status_code == 403
        assert client.post("/api/bundles/x/promote").status_code == 403
    r = admin.post("/api/operating-points", json={"thresholds": {"Effusion": 0.3}})
    assert r.status_code == 201, r.text
    first = r.json()
    assert first["thresholds"]["Effusion"] == 0.3 and first["site"] == ["Effusion"]
    # Sensitivity ≥ 0.9 on 6 positives scored 6.5/12 … 11.5/12: all six needed, so the lowest positive.
    r = admin.post(
        "/api/operating-points", json={"finding": "effusion", "target": "sensitivity", "value": 0.9}
    )
    assert r.status_code == 201, r.text
    second = r.json()
    assert second["thresholds"]["Effusion"] == pytest.approx(6.5 / 12, abs=1e-6)
    assert second["active_version"] == first["active_version"] + 1
    # Specificity ≥ 0.5: the lowest threshold leaving 3 of 6 negatives absent is the 4th negative's score.
    r = admin.post(
        "/api/operating-points", json={"finding": "Effusion", "target": "specificity", "value": 0.5}
    )
    assert r.json()["thresholds"]["Effusion"] == pytest.approx(3.5 / 12, abs=1e-6)
    bad = admin.post("/api/operating-points", json={"thresholds": {"Fracture": 0.3}})
    assert bad.status_code == 422
    # Back to version 1, then to the bundle's own.
    r = admin.post("/api/operating-points/revert", json={"to_version": first["active_version"]})
    assert r.json()["thresholds"]["Effusion"] == 0.3
    r = admin.post("/api/operating-points/revert", json={})
    assert r.json()["thresholds"]["Effusion"] == shipped and r.json()["site"] == []
    assert len(r.json()["history"]) == 5
    with sessions() as s:
        assert len(s.scalars(select(OperatingPointSet)).all()) == 5
        actions = [a.action for a in s.scalars(select(AuditEntry).order_by(AuditEntry.id))]
    assert actions.count("operating_points_set") == 3 and actions.count("operating_points_revert") == 2
    page = reader.get("/operating-points")
    assert page.status_code == 200 and "Effusion" in page.text
    # The validation page runs at the site's thresholds: the report names the active one.
    admin.post("/api/operating-points", json={"thresholds": {"Effusion": 0.5}})
    report = admin.get("/api/validation").json()
    assert next(f for f in report["findings"] if f["finding"] == "Effusion")["threshold"] == 0.5


def test_drift_page_and_gauge(
    sessions: sessionmaker[Session], model: ModelFindings, admin: TestClient
) -> None:
    now = datetime.now(UTC)
    for i in range(5):
        seed_job(
            sessions,
            dict.fromkeys(model.labels, 0.9),
            model.operating_points,
            patient_id=f"P{i}",
            received=now,
        )
    with sessions.begin() as s:
        for job in s.scalars(select(Job)):
            job.finished_at = now
    r = admin.get("/api/drift")
    assert r.status_code == 200
    latest = r.json()["latest_psi"]
    # Every image scored 0.9 on Effusion: far above the reference's top decile, a large PSI.
    assert latest["score:Effusion"] > 1.0
    page = admin.get("/drift")
    assert page.status_code == 200 and 'id="drift-chart"' in page.text and "⚠" in page.text
    metrics = admin.get("/metrics").text
    assert 'cxr_drift_psi{item="score:Effusion"}' in metrics


def test_every_page_shows_shadow_mode(tmp_path: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        dashboard_users=USERS,
        mode="shadow",
        destinations=[
            Destination(ae_title="PACS", host="h", port=104),
            Destination(ae_title="TEST", host="h", port=105, mode=Mode.LIVE),
        ],
    )
    assert [d.mode for d in settings.destinations] == ["shadow", "live"]
    migrate(settings)
    with TestClient(create_app(settings, make_session_factory(settings)), follow_redirects=False) as client:
        client.auth = VIEWER
        for path in ("/", "/validation", "/operating-points", "/bundles", "/drift", "/health"):
            page = client.get(path)
            assert page.status_code == 200, path
            assert 'id="shadow-banner"' in page.text and "TEST" in page.text, path
