"""The job page's source image with the finding regions over it, and the link to the site's viewer."""

from __future__ import annotations

import io
import re
import shutil
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import ValidationError
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from service.admin.previews import thumbnail_size
from service.core.models import Job, Study
from service.core.settings import Settings, load_settings
from service.core.status import JobStatus
from tests.support.paths import CHEST_DICOM
from tests.unit.admin.conftest import make_job

SOURCE = CHEST_DICOM / "cr-pa-mono1-explicit-le.dcm"  # MONOCHROME1, 1841 × 1955
UID = "1.2.3.4.1"
HOSTILE = '<script>alert("x")</script>" onload="alert(1)'
VIEWER = "https://viewer.example/ohif/viewer?site=1&StudyInstanceUIDs={study_uid}"

REGIONS = [
    {
        "label": "Pneumothorax",
        "kind": "outline",
        "level": 0.5,
        "peak": [400.5, 300.0],
        "polygon": [[350.0, 250.0], [450.25, 250.0], [450.0, 350.0], [350.0, 350.0], [350.0, 250.0]],
    },
    {
        "label": HOSTILE,
        "kind": "box",
        "level": 0.5,
        "peak": [1200.0, 1500.0],
        "polygon": [[1100.0, 1400.0], [1300.0, 1400.0], [1300.0, 1600.0], [1100.0, 1600.0], [1100.0, 1400.0]],
    },
]


def _result(**image: Any) -> dict[str, Any]:
    probs = {"Pneumothorax": 0.81234, "Edema": 0.1, HOSTILE: 0.9}
    entry = {"sop_instance_uid": UID, "probabilities": probs, "present": ["Pneumothorax", HOSTILE], **image}
    return {"bundle": {"name": "t", "version": "1"}, "images": [entry], "gate": {}}


def _with_regions(regions: list[Any] | None = None) -> dict[str, Any]:
    return _result(
        rows=1955, columns=1841, score_kind="probability", regions=REGIONS if regions is None else regions
    )


def _spool(settings: Settings, n: int = 0) -> None:
    """The shared chest image where make_job's instance n says it is spooled."""
    target = settings.spool_dir / "x" / str(n)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SOURCE, target)


def _polygons(html: str) -> list[str]:
    return re.findall(r'<polygon points="([^"]*)"', html)


def test_regions_are_drawn_over_the_source_image(admin: TestClient, sessions: sessionmaker[Session]) -> None:
    job = make_job(sessions, JobStatus.DONE, result=_with_regions(), instances=[UID])
    html = admin.get(f"/jobs/{job}").text
    assert f'src="/api/jobs/{job}/images/0.png"' in html and 'id="source-0"' in html
    assert 'viewBox="0 0 1841 1955"' in html
    assert _polygons(html) == [
        "350.0,250.0 450.2,250.0 450.0,350.0 350.0,350.0 350.0,250.0",
        "1100.0,1400.0 1300.0,1400.0 1300.0,1600.0 1100.0,1600.0 1100.0,1400.0",
    ]
    assert html.count('class="region"') == 2
    # Numbered markers at the peaks, and a legend with the values and what they are.
    assert '<circle cx="400.5" cy="300.0"' in html and '<circle cx="1200.0" cy="1500.0"' in html
    legend = re.search(r'<ol class="region-legend" id="legend-0">(.*?)</ol>', html, re.S)
    assert legend is not None
    text = re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", legend.group(1)))
    assert "1 Pneumothorax 0.812 probability" in text and "2 " in text and "0.900 probability" in text
    assert "(box)" in text
    # The hostile label is text everywhere (legend, data attribute, findings table), never markup.
    assert "<script>" not in html and 'onload="alert' not in html
    escaped = "&lt;script&gt;alert(&#34;x&#34;)&lt;/script&gt;&#34; onload=&#34;alert(1)"
    assert html.count(escaped) >= 3  # legend, data attribute, findings table
    assert f'data-label="{escaped}"' in html
    # Distinct colours per region.
    colours = re.findall(r'<polygon points="[^"]*" fill="(#[0-9a-f]{6})"', html)
    assert len(set(colours)) == 2
    detail = admin.get(f"/api/jobs/{job}").json()
    image = detail["images"][0]
    assert (image["rows"], image["columns"], image["score_kind"]) == (1955, 1841, "probability")
    assert [r["label"] for r in image["regions"]] == ["Pneumothorax", HOSTILE]
    assert image["regions"][0]["value"] == pytest.approx(0.81234)
    assert image["source_image"] == f"/api/jobs/{job}/images/0.png"


def test_scores_are_not_called_probabilities(admin: TestClient, sessions: sessionmaker[Session]) -> None:
    result = _with_regions(REGIONS[:1])
    result["images"][0]["score_kind"] = "score"
    job = make_job(sessions, JobStatus.DONE, result=result, instances=[UID])
    html = admin.get(f"/jobs/{job}").text
    assert len(_polygons(html)) == 1
    assert '<th class="num">Score</th>' in html
    legend = re.search(r'<ol class="region-legend" id="legend-0">(.*?)</ol>', html, re.S)
    assert legend is not None and "score" in legend.group(1) and "probability" not in legend.group(1)


def test_malformed_regions_are_left_out(admin: TestClient, sessions: sessionmaker[Session]) -> None:
    bad: list[Any] = [
        "not a region",
        {"label": "A", "kind": "outline", "level": 0.5, "peak": [1, 2], "polygon": [[1, 1], [2, 2]]},
        {"label": "B", "kind": "star", "level": 0.5, "peak": [1, 2], "polygon": [[1, 1], [2, 2], [3, 1]]},
        {"label": "C", "kind": "box", "level": 0.5, "peak": ["x", 2], "polygon": [[1, 1], [2, 2], [3, 1]]},
        {
            "label": "D",
            "kind": "box",
            "level": 0.5,
            "peak": [1, 2],
            "polygon": [[1, float("nan")], [2, 2], [3, 1]],
        },
        {
            "label": "E",
            "kind": "box",
            "level": 0.5,
            "peak": [1, 2],
            "polygon": [[1, 1], [2, 2], [3, 1], [1, 1]],
        },
    ]
    result = _with_regions(bad)
    result["images"][0]["rows"] = "1955"  # not a number: no overlay geometry at all
    job = make_job(sessions, JobStatus.DONE, result=result, instances=[UID])
    r = admin.get(f"/jobs/{job}")
    assert r.status_code == 200
    assert _polygons(r.text) == []  # no viewBox without rows: nothing drawn
    regions = admin.get(f"/api/jobs/{job}").json()["images"][0]["regions"]
    assert [x["label"] for x in regions] == ["E"]


def test_a_job_from_before_regions_still_renders(admin: TestClient, sessions: sessionmaker[Session]) -> None:
    job = make_job(sessions, JobStatus.DONE, result=_result(), instances=[UID, "1.2.3.4.2"])
    r = admin.get(f"/jobs/{job}")
    assert r.status_code == 200
    html = r.text
    assert 'id="overlay-0"' in html and "viewBox" not in html.split('id="overlay-0"')[1].split(">")[0]
    assert _polygons(html) == [] and "region-legend" not in html
    assert f'src="/api/jobs/{job}/images/0.png"' in html
    assert '<th class="num">Probability</th>' in html
    image = admin.get(f"/api/jobs/{job}").json()["images"][0]
    assert image["regions"] == [] and image["rows"] is None and image["score_kind"] is None
    # A job without any result (still running) has no source images at all.
    running = make_job(sessions, JobStatus.RUNNING, instances=["1.2.3.4.9"])
    html = admin.get(f"/jobs/{running}").text
    assert "images/0.png" not in html and "overlay-0" not in html


def test_viewer_link_when_set(admin: TestClient, sessions: sessionmaker[Session], settings: Settings) -> None:
    settings.viewer_url = VIEWER
    job = make_job(sessions, JobStatus.DONE, result=_with_regions(), instances=[UID])
    with sessions.begin() as s:
        study_id = s.scalar(select(Job.study_id).where(Job.id == job))
        s.execute(update(Study).where(Study.id == study_id).values(study_instance_uid='1.2.3&x=<y>"/z'))
    expected = "https://viewer.example/ohif/viewer?site=1&StudyInstanceUIDs=1.2.3%26x%3D%3Cy%3E%22%2Fz"
    href = f'href="{expected.replace("&", "&amp;")}"'
    html = admin.get(f"/jobs/{job}").text
    assert 'id="viewer-link"' in html and href in html
    assert 'rel="noopener noreferrer"' in html
    assert href in admin.get("/").text  # the jobs list row links there too
    assert href in admin.get("/jobs/rows").text
    assert admin.get(f"/api/jobs/{job}").json()["viewer_url"] == expected
    assert admin.get("/api/jobs").json()["items"][0]["viewer_url"] == expected
    # Our own routes never carry the study UID: only the outbound link does.
    own = re.findall(r'(?:href|src|action|data-live-url)="(/[^"]*)"', html)
    assert own and not [u for u in own if "1.2.3" in u]


def test_no_viewer_link_when_unset(admin: TestClient, sessions: sessionmaker[Session]) -> None:
    job = make_job(sessions, JobStatus.DONE, result=_with_regions(), instances=[UID])
    html = admin.get(f"/jobs/{job}").text
    assert "viewer-link" not in html and "Open in viewer" not in html
    assert "viewer-link" not in admin.get("/").text
    assert admin.get(f"/api/jobs/{job}").json()["viewer_url"] is None


def _png(client: TestClient, url: str) -> Image.Image:
    r = client.get(url)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(r.content))


def test_source_image_png_from_the_spool(
    admin: TestClient,
    viewer: TestClient,
    anon: TestClient,
    sessions: sessionmaker[Session],
    settings: Settings,
) -> None:
    _spool(settings)
    job = make_job(sessions, JobStatus.DONE, result=_with_regions(), instances=[UID])
    img = _png(admin, f"/api/jobs/{job}/images/0.png")
    assert img.size == thumbnail_size(1955, 1841) == (482, 512)
    assert img.mode == "L"
    pixels = np.asarray(img, dtype=np.int16)
    assert pixels.std() > 20  # windowed: an image, not a flat field
    assert _png(viewer, f"/api/jobs/{job}/images/0.png").size == (482, 512)
    assert anon.get(f"/api/jobs/{job}/images/0.png").status_code == 401
    for bad in ("1", "-1", "x"):
        assert admin.get(f"/api/jobs/{job}/images/{bad}.png").status_code in {404, 422}
    assert admin.get(f"/api/jobs/{job}/images/1.png").status_code == 404
    assert admin.get(f"/api/jobs/{'0' * 32}/images/0.png").status_code == 404
    # The worker's heuristic found the image stored inverted: shown flipped, as the model saw it.
    flipped = _with_regions()
    flipped["images"][0]["inverted_by_heuristic"] = True
    with sessions.begin() as s:
        s.execute(update(Job).where(Job.id == job).values(result=flipped))
    inverted = np.asarray(_png(admin, f"/api/jobs/{job}/images/0.png"), dtype=np.int16)
    assert np.abs(inverted - (255 - pixels)).max() <= 1


def test_source_image_404_without_its_file(
    admin: TestClient, sessions: sessionmaker[Session], settings: Settings
) -> None:
    # No file in the spool.
    job = make_job(sessions, JobStatus.DONE, result=_with_regions(), instances=[UID])
    assert admin.get(f"/api/jobs/{job}/images/0.png").status_code == 404
    # A result naming an instance the job's study does not have.
    _spool(settings)
    other = make_job(sessions, JobStatus.DONE, result=_with_regions(), instances=["9.9.9"])
    assert admin.get(f"/api/jobs/{other}/images/0.png").status_code == 404
    # A spool path outside the spool dir is never read.
    from service.core.models import Instance

    with sessions.begin() as s:
        s.execute(
            update(Instance).where(Instance.sop_instance_uid == UID).values(spool_path="../../etc/passwd")
        )
    assert admin.get(f"/api/jobs/{job}/images/0.png").status_code == 404


def test_source_image_that_cannot_be_decoded_is_422(
    admin: TestClient, sessions: sessionmaker[Session], settings: Settings
) -> None:
    target = settings.spool_dir / "x" / "0"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    job = make_job(sessions, JobStatus.DONE, result=_with_regions(), instances=[UID])
    r = admin.get(f"/api/jobs/{job}/images/0.png")
    assert r.status_code == 422 and "cannot render" in r.json()["detail"]


# ---------------------------------------------------------------------------------------------- settings


def test_viewer_url_setting(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(data_dir=tmp_path).viewer_url is None
    assert load_settings(data_dir=tmp_path, viewer_url="").viewer_url is None
    ok = "http://pacs.local:8042/ohif/viewer?StudyInstanceUIDs={study_uid}"
    assert load_settings(data_dir=tmp_path, viewer_url=ok).viewer_url == ok
    braces = "https://v.example/{{literal}}/study/{study_uid}"
    assert load_settings(data_dir=tmp_path, viewer_url=braces).viewer_url == braces
    monkeypatch.setenv("CXR_VIEWER_URL", "https://viewer.example/s/{study_uid}")
    assert load_settings(data_dir=tmp_path).viewer_url == "https://viewer.example/s/{study_uid}"
    monkeypatch.delenv("CXR_VIEWER_URL")
    for bad in [
        "https://viewer.example/study",  # no placeholder
        "https://viewer.example/study/{{study_uid}}",  # only a literal
        "ftp://viewer.example/{study_uid}",
        "javascript:alert('{study_uid}')",
        "/relative/{study_uid}",
        "https://viewer.example/{study_uid}/{patient_id}",
        "https://viewer.example/{study_uid}/{",
        "https://viewer.example/{study_uid.real}",
        "https:///{study_uid}",
    ]:
        with pytest.raises(ValidationError, match="viewer_url"):
            load_settings(data_dir=tmp_path, viewer_url=bad)
