"""Radiologists' viewers in a real headless Chromium: OHIF 3.13 (its prebuilt dist) and Orthanc's Web Viewer.

``ViewerProxy`` runs ``deploy/demo/viewer_proxy.py`` (OHIF and Orthanc's DICOMweb on one origin) in a child
process on a free port. ``ohif_page`` opens a study in OHIF, waits until its viewport has settled and
wraps the page in an ``OhifPage`` that reads what OHIF shows. What the helpers rely on, found by
inspecting OHIF 3.13.2's DOM in this browser:

- the viewport: ``[data-cy="viewport-pane"]``; an image viewport holds ``div.viewport-element`` with
  ``canvas.cornerstone-canvas`` (a 2-D canvas that cornerstone copies its WebGL rendering into) and
  ``svg.svg-layer`` over it; the overlays (date, series description, W/L) are siblings,
  ``[data-cy^="viewport-overlay"]``. A crashed viewport (an SR measurement group without a SCOORD)
  leaves the pane empty.
- an SR in the measurement viewport: each annotation is drawn in ``svg.svg-layer`` as its shape
  (``polyline`` for SCOORD POLYLINE, ``ellipse``/``circle``, arrows as ``line``), a dashed ``line`` linking
  it to its text box, and the text box ``g[data-annotation-uid]`` whose ``text`` holds the labels
  ("<NUM concept meaning>: <value> <unit>"; empty when the group has no NUM).
- the tracked-measurements panel (right side, ``[data-cy="trackedMeasurements-btn"]`` opens it): one
  ``[data-cy="data-row"]`` per tracked measurement, its name in ``[data-cy="data-row-title"]``. An SR's
  measurements get there only when the user answers Yes (``[data-cy="yes-hydrate-btn"]``) to "track
  measurements for this study?" *and* OHIF can hydrate them (dcmjs wants the SCOORD as a child of the
  group's NUM, or a group without NUM; otherwise "No spatial coordinates group found", panel empty).
- an SR in the text viewport (any title other than DCM 126000): the pane's text, containers numbered
  ("1.\u00a0X-Ray Report", "1.2.\u00a0Findings") and one line per content item "Concept name: value";
  inside CONTINUOUS containers the names are only in ``title`` attributes, not on screen.
- errors: OHIF's error boundary raises a toast "Something went wrong…" / "Sorry, something went wrong
  there. Try again."; an unsupported series (e.g. GSPS) is flagged "… not supported".
- the first visit starts a guided tour over the viewport: ``localStorage.shownTours`` is preset to skip it.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support.net import free_port
from tests.support.peers import CHROMIUM

REPO_ROOT = Path(__file__).resolve().parents[2]
PROXY_SCRIPT = REPO_ROOT / "deploy" / "demo" / "viewer_proxy.py"

# Headless Chromium as in tests/e2e/test_dashboard_browser.py, with a software WebGL (SwiftShader through
# ANGLE) instead of --disable-gpu: OHIF's cornerstone renders with WebGL only.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--use-gl=angle",
    "--use-angle=swiftshader",
    "--enable-unsafe-swiftshader",
]
SKIP_TOUR = "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))"
OHIF_ERRORS = re.compile(r"something went wrong|not supported", re.IGNORECASE)

PANE = '[data-cy="viewport-pane"]'
CANVAS = f"{PANE} canvas.cornerstone-canvas"
SVG_LAYER = f"{PANE} svg.svg-layer"
SHAPES = ", ".join(f"{SVG_LAYER} {kind}" for kind in ("polyline", "polygon", "ellipse", "circle", "path"))
TEXT_BOXES = f"{SVG_LAYER} g[data-annotation-uid]"
# The overlays and annotations, hidden when only the image's own pixels should be judged.
HIDE_OVERLAYS = (
    '[data-cy^="viewport-overlay"], svg.svg-layer, .ViewportOrientationMarkers {visibility: hidden}'
)

# What the viewport pane shows once OHIF has settled: "error", "image", "text" or false (still loading).
_SETTLED_JS = r"""([pane, errors]) => {
    if (new RegExp(errors, "i").test(document.body.innerText)) return "error";
    const el = document.querySelector(pane);
    if (!el) return false;
    if (el.querySelector("canvas.cornerstone-canvas")) return "image";
    // The SR text viewport numbers its containers: "1.\u00a0X-Ray Report", "1.1.\u00a0Findings", …
    if (/^\s*1\.\s/.test(el.innerText)) return "text";
    return false;
}"""


def ohif_dist() -> Path:
    """OHIF's prebuilt dist: $CXR_OHIF_DIST, else <repo>/build/ohif/dist (made by `make test`)."""
    return Path(os.environ.get("CXR_OHIF_DIST") or REPO_ROOT / "build" / "ohif" / "dist")


class ViewerProxy:
    """``deploy/demo/viewer_proxy.py`` in a child process: OHIF at ``url``, ``/dicom-web/`` to Orthanc."""

    def __init__(self, dist: Path, orthanc_url: str, *, log_path: Path | None = None) -> None:
        self.dist = dist
        self.orthanc_url = orthanc_url
        self.log_path = log_path
        self.port = 0
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def viewer_url(self, study_uid: str, series_uid: str | None = None) -> str:
        """OHIF's viewer on one study; ``series_uid`` opens that series first."""
        query = {"StudyInstanceUIDs": study_uid}
        if series_uid:
            query["initialSeriesInstanceUID"] = series_uid
        return f"{self.url}/viewer?{urllib.parse.urlencode(query)}"

    def start(self, timeout: float = 15.0, attempts: int = 3) -> ViewerProxy:
        command = [sys.executable, str(PROXY_SCRIPT), "--ohif-dist", str(self.dist)]
        command += ["--orthanc", self.orthanc_url]
        for _ in range(attempts):  # free_port can race with another process: retry on a new port
            self.port = free_port()
            log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
            try:
                self._proc = subprocess.Popen(
                    [*command, "--port", str(self.port)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=log,
                )
            finally:
                if isinstance(log, io.IOBase):
                    log.close()
            deadline = time.monotonic() + timeout
            while self._proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.url + "/app-config.js", timeout=1, trust_env=False).is_success:
                        return self
                time.sleep(0.1)
            self.stop()
        raise RuntimeError(f"the viewer proxy did not start (log: {self.log_path})")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def __enter__(self) -> ViewerProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def chromium(args: Sequence[str] = CHROMIUM_ARGS) -> Iterator[Any]:
    """Headless Chromium (Playwright's Browser), by default with software WebGL."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=list(args))
        try:
            yield browser
        finally:
            browser.close()


@dataclass
class PageProblems:
    """What went wrong in a page: console errors, uncaught exceptions."""

    console: list[str] = field(default_factory=list)
    page: list[str] = field(default_factory=list)

    def watch(self, page: Any) -> None:
        page.on("console", lambda m: self.console.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: self.page.append(str(e)))


def pixel_spread(png: bytes) -> float:
    """Standard deviation of a PNG's luminance (0 for a blank, one-colour picture)."""
    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float32).std())


# A chest X-ray or our heatmap spreads its luminance by 50-90 (0-255 scale); a black viewport with a
# faint rendering error stays near 10.
MIN_PICTURE_SPREAD = 20.0


def wait_for_picture(page: Any, canvas: str, hide_css: str, timeout: float = 30.0) -> float:
    """Poll a screenshot of the ``canvas`` element (``hide_css`` hides what lies over it) until its
    luminance spread reaches ``MIN_PICTURE_SPREAD``; returns the last spread (lower: still blank)."""
    deadline = time.monotonic() + timeout
    spread = 0.0
    while time.monotonic() < deadline:
        if page.locator(canvas).count():
            png = page.locator(canvas).first.screenshot(style=hide_css, animations="disabled")
            spread = pixel_spread(png)
            if spread >= MIN_PICTURE_SPREAD:
                break
        page.wait_for_timeout(250)
    return spread


class OhifPage:
    """An OHIF viewer page (Playwright ``page``) and what it shows; close() closes its browser context."""

    def __init__(self, context: Any, page: Any, problems: PageProblems, shown: str) -> None:
        self.context = context
        self.page = page
        self.problems = problems
        self.shown = shown  # "image", "text", "error" or "blank" (nothing after the time limit)

    def close(self) -> None:
        self.context.close()

    def __enter__(self) -> OhifPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ errors

    def error_messages(self) -> list[str]:
        """OHIF's own error reports on screen (error boundary toast, "… not supported")."""
        text = self.page.locator("body").inner_text()
        return [line.strip() for line in text.splitlines() if OHIF_ERRORS.search(line)]

    def problems_report(self) -> dict[str, Any]:
        """Everything that went wrong, for an assertion message ({} when nothing did)."""
        found = {
            "shown": self.shown if self.shown in {"error", "blank"} else None,
            "on screen": self.error_messages(),
            "page errors": self.problems.page,
            "console errors": self.problems.console,
        }
        return {k: v for k, v in found.items() if v}

    # ------------------------------------------------------------------ image viewport

    def wait_for_image(self, timeout: float = 30.0) -> float:
        """Wait until the canvas shows a picture; returns its luminance spread (see ``wait_for_picture``)."""
        return wait_for_picture(self.page, CANVAS, HIDE_OVERLAYS, timeout)

    def overlay_text(self) -> str:
        """The viewport's corner overlays (study date, series description, W/L, instance)."""
        return "\n".join(self.page.locator(f'{PANE} [data-cy^="viewport-overlay"]').all_inner_texts())

    # ------------------------------------------------------------------ measurement SR

    def annotations(self) -> list[str]:
        """The text of each annotation's text box drawn over the image (its labels, one string each)."""
        texts: list[str] = self.page.locator(TEXT_BOXES).evaluate_all("els => els.map(e => e.textContent)")
        return texts

    def shapes(self) -> int:
        """Outlines drawn in the annotation layer (polylines, polygons, ellipses, circles, paths)."""
        count: int = self.page.locator(SHAPES).count()
        return count

    def wait_for_annotations(self, timeout: float = 20.0, settle: float = 1.0) -> list[str]:
        """Wait until annotations appear and their number holds still for ``settle`` s; returns their text."""
        deadline = time.monotonic() + timeout
        seen: list[str] = []
        since = time.monotonic()
        while time.monotonic() < deadline:
            now = self.annotations()
            if now != seen:
                seen, since = now, time.monotonic()
            elif seen and time.monotonic() - since >= settle:
                break
            self.page.wait_for_timeout(200)
        return seen

    def tracked_measurements(self, timeout: float = 10.0) -> list[str]:
        """Answer Yes to "track measurements?", open the measurements panel; the rows' titles."""
        yes = self.page.locator('[data-cy="yes-hydrate-btn"]')
        with contextlib.suppress(Exception):
            yes.wait_for(timeout=timeout * 1000)
            yes.click()
        self.page.locator('[data-cy="trackedMeasurements-btn"]').click()
        self.page.locator('[data-cy="trackedMeasurements-panel"]').first.wait_for(timeout=timeout * 1000)
        self.page.wait_for_timeout(500)
        titles: list[str] = self.page.locator('[data-cy="data-row-title"]').all_inner_texts()
        return titles

    # ------------------------------------------------------------------ text SR

    def sr_text(self) -> str:
        """What the SR text viewport prints: one line per content item."""
        text: str = self.page.locator(PANE).first.inner_text()
        return text


def ohif_page(
    browser: Any, url: str, *, timeout: float = 30.0, size: tuple[int, int] = (1440, 900)
) -> OhifPage:
    """Open ``url`` (``ViewerProxy.viewer_url``) in a fresh context; wait until the viewport has settled.

    Settled means: an image canvas, an SR text viewport or an OHIF error is shown; after ``timeout`` seconds
    without any, ``shown`` is "blank" (a crashed viewport stays empty). Console and page errors are
    collected from the first request on.
    """
    context = browser.new_context(viewport={"width": size[0], "height": size[1]}, device_scale_factor=1)
    context.add_init_script(SKIP_TOUR)
    page = context.new_page()
    problems = PageProblems()
    problems.watch(page)
    page.goto(url)
    shown = "blank"
    with contextlib.suppress(Exception):  # Playwright's TimeoutError: reported as "blank"
        handle = page.wait_for_function(
            _SETTLED_JS, arg=[PANE, OHIF_ERRORS.pattern], timeout=timeout * 1000, polling=200
        )
        shown = str(handle.json_value())
    return OhifPage(context, page, problems, shown)


class OrthancWebViewerPage:
    """Orthanc's Web Viewer plugin (``/web-viewer/app/viewer.html?series=<Orthanc series id>``): a legacy
    cornerstone ``canvas`` in ``#dicomImage``, the series description in the ``#topright`` overlay."""

    CANVAS = "#dicomImage canvas"
    HIDE_OVERLAYS = (
        "#topleft, #topright, #bottomleft, #bottomright, #bottomcenter, #bottom {visibility: hidden}"
    )

    def __init__(self, browser: Any, orthanc_url: str, series_id: str, size: tuple[int, int] = (1200, 800)):
        self.context = browser.new_context(viewport={"width": size[0], "height": size[1]})
        self.page = self.context.new_page()
        self.problems = PageProblems()
        self.problems.watch(self.page)
        self.page.goto(f"{orthanc_url}/web-viewer/app/viewer.html?series={series_id}")

    def wait_for_image(self, timeout: float = 30.0) -> float:
        return wait_for_picture(self.page, self.CANVAS, self.HIDE_OVERLAYS, timeout)

    def overlay_text(self) -> str:
        text: str = self.page.locator("#topright").inner_text()
        return text

    def __enter__(self) -> OrthancWebViewerPage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.context.close()


@dataclass
class Screenshots:
    """PNGs into tmp_path/screenshots and, when $CXR_SCREENSHOTS_DIR is set, there too (docs/viewers)."""

    tmp_path: Path
    dirs: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.dirs = [self.tmp_path / "screenshots"]
        if os.environ.get("CXR_SCREENSHOTS_DIR"):
            self.dirs.append(Path(os.environ["CXR_SCREENSHOTS_DIR"]))
        for d in self.dirs:
            d.mkdir(parents=True, exist_ok=True)

    def take(self, page: Any, name: str) -> Path:
        path = self.dirs[0] / f"{name}.png"
        page.screenshot(path=str(path))
        for d in self.dirs[1:]:
            shutil.copyfile(path, d / path.name)
        return path


def describe(value: Any) -> str:
    """Compact JSON for assertion messages."""
    return json.dumps(value, indent=1, default=str)[:4000]
