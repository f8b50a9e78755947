"""Our results in the viewers a radiologist opens: OHIF 3.13 over DICOMweb and Orthanc's Web Viewer.

The real path: the gateway (``cxr-gateway serve``) sends its outputs to an Orthanc with the DICOMweb and
Web Viewer plugins; OHIF's prebuilt dist is served on one origin with Orthanc's DICOMweb by
``deploy/demo/viewer_proxy.py``; a headless Chromium (software WebGL) opens each series. One chest study
and one non-chest study are sent once for the module. What OHIF shows is read from its DOM
(``tests/support/viewers.py`` says where). Screenshots go to tmp_path, and to $CXR_SCREENSHOTS_DIR when
set (docs/viewers is made that way).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import SHARED_DIR, unavailable
from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses
from tests.support.orthanc import OrthancServer
from tests.support.peers import require_peer
from tests.support.studies import with_fresh_uids
from tests.support.viewers import (
    OhifPage,
    OrthancWebViewerPage,
    Screenshots,
    ViewerProxy,
    chromium,
    describe,
    ohif_dist,
    ohif_page,
)

CHEST = "dicom/chest/sc-pa-jpeg-baseline.dcm"
NOT_CHEST = "dicom/not-chest/cr-tibia-j2k-lossless.dcm"
# Series numbers of the outputs (docs/sr-design.md); a not-analysed study gets its report as 9901.
MEASUREMENT_SR, HEATMAP_SC, RESULTS_SR = 9901, 9902, 9904
DISCLAIMER = "not for diagnostic use"
# How the results report names each NIH finding: its code meaning.
REPORT_NAMES = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural effusion",
    "Infiltration": "Infiltrate",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Lung consolidation",
    "Edema": "Pulmonary edema",
    "Emphysema": "Pulmonary emphysema",
    "Fibrosis": "Fibrosis",
    "Pleural_Thickening": "Pleural thickening",
    "Hernia": "Hiatal hernia",
}
# A word every output uses for the finding, in any case ("Emphysema score" on the image, "Pulmonary
# emphysema" in the report, "Effusion" or "Pleural effusion").
STEMS = {
    "Atelectasis": "atelectasis",
    "Cardiomegaly": "cardiomegaly",
    "Effusion": "effusion",
    "Infiltration": "infiltrat",
    "Mass": "mass",
    "Nodule": "nodule",
    "Pneumonia": "pneumonia",
    "Pneumothorax": "pneumothorax",
    "Consolidation": "consolidation",
    "Edema": "edema",
    "Emphysema": "emphysema",
    "Fibrosis": "fibrosis",
    "Pleural_Thickening": "pleural thickening",
    "Hernia": "hernia",
}


@dataclass
class Study:
    """One study sent to the gateway: its job (dashboard API) and its series in the PACS by number."""

    uid: str
    job: dict[str, Any]
    series: dict[int, dict[str, str]]  # SeriesNumber -> {"uid", "id" (Orthanc), "description"}

    def series_uid(self, number: int) -> str:
        return self.series[number]["uid"]

    def analysed_image(self) -> dict[str, Any]:
        images = [i for i in self.job["images"] if i["decision"] == "analysed"]
        assert len(images) == 1, describe(self.job["images"])
        return images[0]


@dataclass
class Site:
    pacs: OrthancServer
    gateway: GatewayProcesses
    proxy: ViewerProxy
    chest: Study
    not_chest: Study

    def ohif(self, browser: Any, study: Study, number: int) -> OhifPage:
        return ohif_page(browser, self.proxy.viewer_url(study.uid, study.series_uid(number)))


def _require_peers() -> Path:
    dist = ohif_dist()
    if not (dist / "index.html").is_file():
        unavailable(f"OHIF's dist is missing at {dist} (make test unpacks @ohif/app; or set CXR_OHIF_DIST)")
    require_peer("orthanc", "orthanc-dicomweb", "orthanc-webviewer", "dcmtk", "chromium")
    if not SHARED_DIR.is_dir():
        unavailable(f"shared data directory {SHARED_DIR} is absent")
    try:
        import playwright  # noqa: F401
    except ImportError:
        unavailable("playwright is not installed (pip install playwright; no `playwright install` needed)")
    return dist


def _final(jobs: list[dict[str, Any]]) -> bool:
    """Both jobs over: failed, or finished with every output delivered."""
    return len(jobs) == 2 and all(
        j["status"] == "failed"
        or (
            j["status"] in {"done", "skipped"}
            and j["deliveries"]
            and all(d["status"] == "delivered" for d in j["deliveries"])
        )
        for j in jobs
    )


def _study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _study(
    site_pacs: OrthancServer, gateway: GatewayProcesses, uid: str, job: dict[str, Any], want: set[int]
) -> Study:
    def series() -> dict[int, dict[str, str]]:
        found = {
            int(s["MainDicomTags"].get("SeriesNumber") or 0): {
                "uid": s["MainDicomTags"]["SeriesInstanceUID"],
                "id": s["ID"],
                "description": s["MainDicomTags"].get("SeriesDescription", ""),
            }
            for s in site_pacs.series_of_study(uid)
        }
        return found if want <= found.keys() else {}

    got = site_pacs.wait_for(series, timeout=30, message=f"series {sorted(want)} of study {uid}")
    return Study(uid, gateway.api(f"/api/jobs/{job['id']}"), got)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """Orthanc (DICOMweb + Web Viewer) as the PACS, the gateway sending to it, the viewer proxy; a chest
    and a non-chest study sent and their results delivered."""
    dist = _require_peers()
    base = tmp_path_factory.mktemp("viewers")
    chest = with_fresh_uids(SHARED_DIR / CHEST, base / "in" / "chest.dcm")
    other = with_fresh_uids(SHARED_DIR / NOT_CHEST, base / "in" / "not-chest.dcm")
    with OrthancServer(dicomweb=True, webviewer=True, workdir=base / "pacs") as pacs:
        dest = [{"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}]
        with GatewayProcesses(base / "gw", destinations=dest) as gateway:
            try:
                # The modality sends each study to the PACS and to the gateway: viewers draw the SR's
                # regions on the source image, which the gateway never sends back.
                for path in (chest, other):
                    for port, aet in ((pacs.dicom_port, pacs.aet), (gateway.listener_port, gateway.ae_title)):
                        sent = storescu("127.0.0.1", port, [path], called_aet=aet)
                        assert sent.returncode == 0, sent.stderr
                jobs = gateway.wait_for_jobs(_final, timeout=150)
                done = {j["status"]: j for j in jobs}
                assert set(done) == {"done", "skipped"}, describe(jobs)
                chest_uid, other_uid = _study_uid(chest), _study_uid(other)
                with ViewerProxy(dist, pacs.url, log_path=base / "proxy.log") as proxy:
                    yield Site(
                        pacs,
                        gateway,
                        proxy,
                        _study(
                            pacs, gateway, chest_uid, done["done"], {MEASUREMENT_SR, HEATMAP_SC, RESULTS_SR}
                        ),
                        _study(pacs, gateway, other_uid, done["skipped"], {MEASUREMENT_SR}),
                    )
            except BaseException:
                print(gateway.log_tail(120))
                print(pacs.log_tail(40))
                raise


@pytest.fixture(scope="module")
def browser(site: Site) -> Iterator[Any]:
    with chromium() as b:
        yield b


@pytest.fixture
def shots(tmp_path: Path) -> Screenshots:
    return Screenshots(tmp_path)


# ---------------------------------------------------------------------------------------------- OHIF


def test_heatmap_sc_renders_in_ohif(site: Site, browser: Any, shots: Screenshots) -> None:
    with site.ohif(browser, site.chest, HEATMAP_SC) as ohif:
        assert ohif.shown == "image", describe(ohif.problems_report())
        spread = ohif.wait_for_image()
        shots.take(ohif.page, "ohif-heatmap-sc")
        assert spread >= 20, f"the heatmap SC's viewport stays blank (luminance spread {spread:.1f})"
        # The SC is what is on screen, not the X-ray it was opened beside.
        assert site.chest.series[HEATMAP_SC]["description"] in ohif.overlay_text()
        assert not ohif.problems_report(), describe(ohif.problems_report())


def test_measurement_sr_draws_one_labelled_region_per_present_finding(
    site: Site, browser: Any, shots: Screenshots
) -> None:
    image = site.chest.analysed_image()
    regions = image["regions"]
    # Without a finding above its operating point this test would prove nothing.
    assert regions, f"no region for the chest study: {describe(image)}"
    with site.ohif(browser, site.chest, MEASUREMENT_SR) as ohif:
        assert ohif.shown == "image", describe(ohif.problems_report())
        labels = ohif.wait_for_annotations()
        spread = ohif.wait_for_image()
        shots.take(ohif.page, "ohif-measurement-sr")
        assert not ohif.problems_report(), describe(ohif.problems_report())
        assert spread >= 20, f"the X-ray under the SR's regions stays blank (luminance spread {spread:.1f})"
        assert len(labels) == ohif.shapes() == len(regions), describe({"drawn": labels, "regions": regions})
        for region in regions:
            named = [text for text in labels if STEMS[region["label"]] in text.lower()]
            assert len(named) == 1, f"{region['label']}: {describe(labels)}"
            if region["value"] is not None:
                # OHIF prints the NUM to two decimals and its unit: "0.83 {score}", or "83.00 %" for a
                # calibrated bundle's probability (the job result keeps six decimals: compare numbers).
                kind = image["score_kind"]
                unit, scale = ("%", 100.0) if kind == "probability" else ("{score}", 1.0)
                found = re.search(rf"{kind}: (\d+\.\d\d) {re.escape(unit)}", named[0])
                assert found, f"{region['label']}: {named[0]}"
                assert abs(float(found.group(1)) - scale * region["value"]) <= 0.0051, named[0]


def test_results_sr_lists_all_14_findings_in_ohif(site: Site, browser: Any, shots: Screenshots) -> None:
    present = set(site.chest.analysed_image()["present"])
    with site.ohif(browser, site.chest, RESULTS_SR) as ohif:
        assert ohif.shown == "text", describe(ohif.problems_report())
        text = ohif.sr_text()
        shots.take(ohif.page, "ohif-results-sr")
        assert not ohif.problems_report(), describe(ohif.problems_report())
    assert DISCLAIMER in text.lower(), text
    lines = [line.strip() for line in text.splitlines()]
    for label, name in REPORT_NAMES.items():
        rows = [line for line in lines if re.match(rf"{re.escape(name)}: (Present|Absent)\b", line)]
        assert len(rows) == 1, f"{label} ({name}) is not one row of the findings table:\n{text}"
        assert rows[0].split(": ")[1].startswith("Present" if label in present else "Absent"), rows[0]


def test_results_sr_shows_every_findings_score_in_ohif(site: Site, browser: Any) -> None:
    image = site.chest.analysed_image()
    probabilities = image["probabilities"]
    # Probabilities are shown in percent (one decimal), scores as they are (three decimals).
    scale, tolerance = (100.0, 0.06) if image["score_kind"] == "probability" else (1.0, 0.0006)
    with site.ohif(browser, site.chest, RESULTS_SR) as ohif:
        assert ohif.shown == "text", describe(ohif.problems_report())
        lines = [line.lower() for line in ohif.sr_text().splitlines()]
    unseen = []
    for label, value in probabilities.items():
        shown = [
            float(number)
            for line in lines
            if STEMS[label] in line
            # OHIF drops a zero fraction: 3.0 % is shown "3 %".
            for number in re.findall(r"(?<![\d.])\d+(?:\.\d+)?(?![\d.])", line)
        ]
        if not any(abs(number - scale * value) < tolerance for number in shown):
            unseen.append(f"{label} {value:.4f}: {[line for line in lines if STEMS[label] in line]}")
    assert not unseen, f"scores not on screen: {unseen}"


def test_not_analysed_sr_opens_in_ohif(site: Site, browser: Any, shots: Screenshots) -> None:
    assert site.not_chest.job["status"] == "skipped"
    with site.ohif(browser, site.not_chest, MEASUREMENT_SR) as ohif:
        assert ohif.shown == "text", describe(ohif.problems_report())
        text = ohif.sr_text()
        shots.take(ohif.page, "ohif-not-analysed-sr")
        assert not ohif.problems_report(), describe(ohif.problems_report())
    assert "not analysed" in text.lower(), text
    assert DISCLAIMER in text.lower(), text


# ---------------------------------------------------------------------------------------------- Orthanc


def test_heatmap_sc_renders_in_orthanc_web_viewer(site: Site, browser: Any, shots: Screenshots) -> None:
    sc = site.chest.series[HEATMAP_SC]
    with OrthancWebViewerPage(browser, site.pacs.url, sc["id"]) as viewer:
        spread = viewer.wait_for_image()
        shots.take(viewer.page, "orthanc-web-viewer-sc")
        assert spread >= 20, f"Orthanc's web viewer shows a blank SC (luminance spread {spread:.1f})"
        assert sc["description"] in viewer.overlay_text()
        # Console errors are not checked here: Chromium's favicon request answers 404.
        assert not viewer.problems.page, viewer.problems.page


def test_viewer_proxy_serves_ohif_and_streams_dicomweb(site: Site) -> None:
    """The one-origin proxy: our app-config, OHIF's files with their types, Orthanc's DICOMweb behind it."""
    import httpx

    with httpx.Client(base_url=site.proxy.url, timeout=30, trust_env=False) as client:
        config = client.get("/app-config.js")
        assert config.headers["content-type"].startswith("text/javascript")
        assert "qidoRoot: '/dicom-web'" in config.text and "d14fa38qiwhyfd" not in config.text
        assert client.get("/viewer?StudyInstanceUIDs=1.2.3").text == client.get("/").text  # SPA fallback
        wasm = next(p.name for p in ohif_dist().glob("*.wasm"))
        assert client.head(f"/{wasm}").headers["content-type"] == "application/wasm"
        studies = client.get("/dicom-web/studies", headers={"Accept": "application/dicom+json"})
        assert studies.status_code == 200 and len(studies.json()) == 2
        sc = site.chest.series_uid(HEATMAP_SC)
        frames = client.get(
            f"/dicom-web/studies/{site.chest.uid}/series/{sc}/metadata",
            headers={"Accept": "application/json"},
        )
        assert frames.status_code == 200
        # Bulk-data links point at the origin the viewer used (no "Host" in Orthanc's DicomWeb config).
        assert "localhost" not in frames.text
        missing = client.get("/dicom-web/studies/1.2.3/series", headers={"Accept": "application/dicom+json"})
        assert missing.status_code in {200, 204, 404}
    assert "dicom-web" not in (site.proxy.log_path.read_text() if site.proxy.log_path else "")
