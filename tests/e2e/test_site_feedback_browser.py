"""Reader feedback in a real Chromium against a running dashboard (`cxr-gateway dashboard` on a data dir
with an analysed job): the reader marks findings on the job's page, the verdicts come back on the page
and through the API, a viewer sees no form, and a bad label file is refused with its line numbers."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.core.db import make_session_factory, migrate
from service.core.settings import load_settings
from service.site.findings import bundle_findings
from tests.e2e.test_dashboard_browser import _login
from tests.e2e.test_dashboard_browser import browser as browser
from tests.support.net import free_port, wait_for_port
from tests.unit.site.conftest import seed_job

READER = ("rosa", "rosa-browser-pw")
VIEWER = ("vera", "vera-browser-pw")


@pytest.fixture
def dashboard(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The dashboard serving a data dir with one analysed job; yields (url, job id)."""
    import json

    users = [
        {"username": READER[0], "password": READER[1], "role": "reader"},
        {"username": VIEWER[0], "password": VIEWER[1], "role": "viewer"},
    ]
    settings = load_settings(data_dir=tmp_path / "gw", database_url=None)
    migrate(settings)
    model = bundle_findings(settings.model_bundle)
    scores = {f: 0.9 if f in {"Effusion", "Cardiomegaly"} else 0.001 for f in model.labels}
    job_id, _ = seed_job(make_session_factory(settings), scores, model.operating_points)
    port = free_port()
    env = {
        **os.environ,
        "CXR_DATA_DIR": str(settings.data_dir),
        "CXR_DASHBOARD_PORT": str(port),
        "CXR_DASHBOARD_USERS": json.dumps(users),
    }
    env.pop("CXR_DATABASE_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "service.cli", "dashboard"], env=env)
    try:
        wait_for_port("127.0.0.1", port, timeout=60)
        yield f"http://127.0.0.1:{port}", job_id
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_reader_feedback_round_trips_through_the_browser(
    browser: Any,
    dashboard: tuple[str, str],
) -> None:
    url, job_id = dashboard
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    ctx.set_default_timeout(20_000)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    _login(page, url, READER)
    page.goto(f"{url}/jobs/{job_id}")
    page.check("input[name='verdict:Effusion'][value=agree]")
    page.check("input[name='verdict:Cardiomegaly'][value=disagree]")
    page.check("input[name='verdict:Hernia'][value=unsure]")
    page.select_option("#missed", "Pneumothorax")
    page.click("#feedback-submit")
    page.wait_for_selector("text=Feedback recorded on 4 findings")
    rows = page.locator("#feedback-given tbody tr").all_inner_texts()
    given = {r.split("\t")[0]: r.split("\t")[1] for r in rows}
    assert given == {
        "Effusion": "agree",
        "Cardiomegaly": "disagree",
        "Hernia": "unsure",
        "Pneumothorax": "missed",
    }
    # The form shows the reader's own verdicts when they come back.
    assert page.is_checked("input[name='verdict:Cardiomegaly'][value=disagree]")
    api = httpx.get(f"{url}/api/jobs/{job_id}/feedback", auth=READER).json()
    assert {f["finding"]: (f["verdict"], f["username"]) for f in api} == {
        "Effusion": ("agree", READER[0]),
        "Cardiomegaly": ("disagree", READER[0]),
        "Hernia": ("unsure", READER[0]),
        "Pneumothorax": ("missed", READER[0]),
    }

    # A bad label file through the upload page: refused whole, its lines named.
    page.goto(f"{url}/labels")
    page.set_input_files(
        "#labels-file",
        files=[
            {"name": "ris.csv", "mimeType": "text/csv", "buffer": b"AccessionNumber,Findings\nNOPE,Mass\n"}
        ],
    )
    page.click("#labels-submit")
    page.wait_for_selector("#label-problems")
    assert "line 2: unknown study" in page.inner_text("#label-problems")
    # The seeded job has no spooled image (its picture answers 404) and the refused file answers 422:
    # nothing else may fail on these pages.
    assert [e for e in errors if "Failed to load resource" not in e] == []

    viewer = browser.new_context().new_page()
    _login(viewer, url, VIEWER)
    viewer.goto(f"{url}/jobs/{job_id}")
    assert viewer.locator("#feedback-form").count() == 0
    assert viewer.locator("#feedback-given tbody tr").count() == 4
    refused = httpx.post(
        f"{url}/api/jobs/{job_id}/feedback",
        json={"verdicts": [{"finding": "Mass", "verdict": "agree"}]},
        auth=VIEWER,
    )
    assert refused.status_code == 403
