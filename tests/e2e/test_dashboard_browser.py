"""The dashboard in a real headless Chromium against a running gateway (`serve`, Orthanc as the PACS).

Signs in, sends a study with storescu and watches it reach "done" on the live jobs page, opens it and sees
the heatmap, uploads a PNG, requeues as admin, and is refused as a viewer. Screenshots of the main pages
go to tmp_path, and also to $CXR_SCREENSHOTS_DIR when set (docs/screenshots is made that way).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import unavailable
from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses
from tests.support.orthanc import OrthancServer
from tests.support.peers import require_peer
from tests.support.studies import with_fresh_uids
from tests.support.viewers import chromium

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ADMIN = ("ada", "ada-browser-pw")
VIEWER = ("vic", "vic-browser-pw")
UPLOAD_PNG = "data/nih-cxr14-dev/images/00000846_000.png"


@pytest.fixture
def browser() -> Iterator[Any]:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        unavailable("playwright is not installed (pip install playwright; no `playwright install` needed)")
    require_peer("chromium")
    with chromium(CHROMIUM_ARGS) as b:
        yield b


@pytest.fixture
def gateway(tmp_path: Path, orthanc: OrthancServer) -> Iterator[GatewayProcesses]:
    users = [
        {"username": ADMIN[0], "password": ADMIN[1], "role": "admin"},
        {"username": VIEWER[0], "password": VIEWER[1], "role": "viewer"},
    ]
    dest = [{"ae_title": orthanc.aet, "host": "127.0.0.1", "port": orthanc.dicom_port}]
    with GatewayProcesses(tmp_path / "gw", destinations=dest, dashboard_users=users) as gw:
        gw.admin = ADMIN
        try:
            yield gw
        except BaseException:
            print(gw.log_tail(200))
            raise


class Shots:
    def __init__(self, tmp_path: Path) -> None:
        self.dirs = [tmp_path / "screenshots"]
        if os.environ.get("CXR_SCREENSHOTS_DIR"):
            self.dirs.append(Path(os.environ["CXR_SCREENSHOTS_DIR"]))
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)

    def take(self, page: Any, name: str, full_page: bool = True) -> None:
        path = self.dirs[0] / f"{name}.png"
        page.screenshot(path=str(path), full_page=full_page)
        for d in self.dirs[1:]:
            shutil.copyfile(path, d / path.name)


def _login(page: Any, url: str, who: tuple[str, str]) -> None:
    page.goto(url + "/")
    assert "/login" in page.url
    page.fill("input[name=username]", who[0])
    page.fill("input[name=password]", who[1])
    page.click("button[type=submit]")
    page.wait_for_url(url + "/")


def test_dashboard_in_a_browser(
    browser: Any, gateway: GatewayProcesses, shared_dir: Path, tmp_path: Path, orthanc: OrthancServer
) -> None:
    url = gateway.dashboard_url
    shots = Shots(tmp_path)
    ctx = browser.new_context(viewport={"width": 1440, "height": 900}, device_scale_factor=1)
    ctx.set_default_timeout(20_000)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("dialog", lambda d: d.accept())

    page.goto(url + "/")
    page.wait_for_selector("input[name=password]")
    shots.take(page, "login", full_page=False)
    _login(page, url, ADMIN)
    assert page.is_visible("text=not for diagnostic use")

    source = with_fresh_uids(shared_dir / "dicom/chest/cr-pa-mono1-explicit-le.dcm", tmp_path / "in/a.dcm")
    sent = storescu("127.0.0.1", gateway.listener_port, [source], called_aet=gateway.ae_title)
    assert sent.returncode == 0, sent.stderr
    # The jobs page updates itself: no reload from here on.
    page.wait_for_selector("#jobs-body .pill.s-done", timeout=150_000)
    page.wait_for_selector("#jobs-body .pill.d-delivered", timeout=60_000)
    assert page.inner_text("#jobs-live .pager").startswith("1 job ")

    page.click("#jobs-body a.mono")
    page.wait_for_selector("#heatmap-0")
    page.wait_for_function("document.querySelector('#heatmap-0').naturalWidth > 0")
    assert page.locator("svg.bar").count() == 14
    # The source image with the finding regions over it (the demo model may find none: zero polygons).
    page.wait_for_function("document.querySelector('#source-0').complete")
    assert page.evaluate("document.querySelector('#source-0').naturalWidth") > 0
    assert page.locator("#overlay-0").count() == 1
    assert page.locator("#viewer-link").count() == 0  # no CXR_VIEWER_URL, no viewer link
    assert page.is_visible("text=AI-generated · not for diagnostic use")
    job_url = page.url
    shots.take(page, "job")

    # Upload a PNG chest image: wrapped as an SC, C-STOREd to our listener, analysed like any study.
    page.goto(url + "/upload")
    shots.take(page, "upload", full_page=False)
    page.set_input_files("#upload-file", str(shared_dir / UPLOAD_PNG))
    page.click("#upload-submit")
    page.wait_for_url(lambda u: "/jobs/" in u, timeout=60_000)
    page.wait_for_selector("#heatmap-0", timeout=150_000)  # the page reloads itself once the job is done
    assert page.inner_text(".facts dd") == "CXR_DASHBOARD"  # source AE: the dashboard sent it

    # Requeue as admin: a new job for the same study.
    page.goto(job_url)
    page.click("#requeue")
    page.wait_for_selector("text=Requeued as a new job")
    assert page.url != job_url
    page.wait_for_selector("#job-status.s-done", timeout=150_000)
    page.goto(url + "/")
    page.wait_for_function("document.querySelectorAll('#jobs-body .pill.s-done').length == 3")
    shots.take(page, "jobs", full_page=False)

    page.goto(url + "/dead-letters")
    shots.take(page, "dead-letters", full_page=False)
    page.goto(url + "/peers")
    page.click("#echo-destination-0")
    page.wait_for_selector("text=C-ECHO succeeded")
    shots.take(page, "peers", full_page=False)
    page.goto(url + "/health")
    # The real worker that analysed the studies reports through its heartbeat.
    assert page.locator("#workers .pill.w-alive").count() == 1
    assert page.inner_text("#workers tbody td.mono").startswith("cxr-")
    shots.take(page, "health", full_page=False)
    page.goto(url + "/audit")
    assert page.locator("text=requeue").count() >= 1 and page.locator("text=upload").count() >= 1
    shots.take(page, "audit", full_page=False)
    # The API docs render from our own origin (no CDN: this machine, like a hospital, is offline).
    page.goto(url + "/docs")
    page.wait_for_selector(".swagger-ui .info .title")
    assert page.get_by_text("/api/jobs/{job_id}/requeue", exact=True).count() >= 1
    assert not errors, errors
    ctx.close()

    # A viewer reads everything but changes nothing.
    vctx = browser.new_context(viewport={"width": 1440, "height": 900})
    vpage = vctx.new_page()
    _login(vpage, url, VIEWER)
    vpage.goto(job_url)
    assert vpage.locator("#requeue").count() == 0 and vpage.locator("#reveal").count() == 0
    token = vpage.get_attribute("input[name=csrf_token]", "value")
    job_id = job_url.rsplit("/", 1)[1]
    status = vpage.evaluate(
        """async ([jobId, token]) => {
            const body = new URLSearchParams({csrf_token: token});
            const r = await fetch(`/jobs/${jobId}/requeue`, {method: "POST", body, redirect: "manual"});
            return r.status;
        }""",
        [job_id, token],
    )
    assert status == 403
    vctx.close()
