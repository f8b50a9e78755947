"""Site operating points on the real worker path: a threshold an admin sets changes the next job's
Present/Absent, in its result and its SRs, and is recorded in both; a revert restores the bundle's."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from sqlalchemy import select

from service.core.models import Delivery, Job
from service.core.status import JobStatus
from service.site import operating_points
from tests.support.runtime import worker_runtime
from tests.support.studies import enqueue_files
from worker.dicom.codes import display_name
from worker.pipeline import process_study
from worker.runtime import Runtime

STUDY = "dicom/chest/sc-pa-jpeg-baseline.dcm"


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    with worker_runtime(tmp_path) as rt:
        yield rt


def _again(rt: Runtime, job_id: str) -> str:
    """A new job of the same study (as a re-sent study would make)."""
    with rt.sessions.begin() as s:
        first = s.get(Job, job_id)
        assert first is not None
        job = Job(study_id=first.study_id, status=JobStatus.QUEUED, queued_at=datetime.now(UTC))
        s.add(job)
        s.flush()
        return job.id


def _result(rt: Runtime, job_id: str) -> dict[str, Any]:
    with rt.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == JobStatus.DONE and job.result is not None
        return job.result


def _texts(ds: Dataset) -> list[str]:
    """Every TEXT value of an SR's content tree."""
    out = []
    for item in ds.get("ContentSequence", []):
        if "TextValue" in item:
            out.append(str(item.TextValue))
        out += _texts(item)
    return out


def _report_row(ds: Dataset, finding: str) -> tuple[str, float]:
    """The results SR's row of a finding: its Present/Absent and its operating point (percent)."""
    for row in ds.ContentSequence[-1].ContentSequence:  # the Findings container, one row per finding
        items = list(row.get("ContentSequence", []))
        names = [str(it.ConceptNameCodeSequence[0].CodeMeaning) for it in items]
        if any(
            n.startswith(f"{display_name(finding)} ") and n.endswith(("probability", "score")) for n in names
        ):
            call = next(str(it.ConceptCodeSequence[0].CodeMeaning) for it in items if it.ValueType == "CODE")
            point = next(
                float(it.MeasuredValueSequence[0].NumericValue)
                for it, n in zip(items, names, strict=True)
                if n == "Operating point"
            )
            return call, point
    raise AssertionError(f"no row for {finding}")


def _sr(rt: Runtime, job_id: str, kind: str) -> Dataset:
    with rt.sessions() as s:
        path = s.scalars(
            select(Delivery.output_path).where(Delivery.job_id == job_id, Delivery.kind == kind)
        ).one()
    return dcmread(rt.settings.output_dir / path)


def test_a_site_threshold_changes_the_next_sr_and_is_recorded(runtime: Runtime, shared_dir: Path) -> None:
    first = enqueue_files(runtime, [shared_dir / STUDY])
    process_study(first, runtime)
    before = _result(runtime, first)
    assert before["operating_points"]["source"] == "bundle"
    assert before["operating_points"]["version"] is None
    image = before["images"][0]
    scores, shipped = image["probabilities"], before["operating_points"]["thresholds"]
    # Flipped: the highest-scoring finding the bundle calls absent, present under a threshold just below.
    absent = {k: v for k, v in scores.items() if k not in image["present"]}
    flipped = max(absent, key=absent.__getitem__)
    lowered = float(f"{scores[flipped] - 0.0005:.4f}")
    # Moved: a present finding with a region keeps its call at a threshold between the bundle's and its
    # score; its measurement group's TID 4019 parameters must name the new threshold.
    moved = next(r["label"] for r in image["regions"] if scores[r["label"]] - shipped[r["label"]] > 0.002)
    between = float(f"{(scores[moved] + shipped[moved]) / 2:.4f}")
    assert lowered < shipped[flipped] and between != shipped[moved]
    assert _report_row(_sr(runtime, first, "report"), flipped)[0] == "Absent"
    bundle_version = before["bundle"]["version"]
    with runtime.sessions.begin() as s:
        row = operating_points.set_thresholds(
            s, bundle_version, list(scores), {flipped: lowered, moved: between}, reason="t", username="admin"
        )
        version = row.id

    second = _again(runtime, first)
    process_study(second, runtime)
    after = _result(runtime, second)
    assert after["operating_points"] == {
        "source": "site",
        "version": version,
        "thresholds": {**shipped, flipped: lowered, moved: between},
        "site": sorted([flipped, moved]),
    }
    assert flipped in after["images"][0]["present"] and moved in after["images"][0]["present"]
    call, point = _report_row(_sr(runtime, second, "report"), flipped)
    assert call == "Present" and point == pytest.approx(100 * lowered, abs=0.051)
    texts = _texts(_sr(runtime, second, "sr"))
    assert f"threshold={between:.6g}" in texts
    assert f"threshold={shipped[moved]:.6g}" in _texts(_sr(runtime, first, "sr"))

    with runtime.sessions.begin() as s:
        operating_points.revert(s, bundle_version, None, username="admin")
    third = _again(runtime, first)
    process_study(third, runtime)
    reverted = _result(runtime, third)
    assert reverted["operating_points"]["source"] == "bundle"
    assert reverted["operating_points"]["thresholds"] == shipped
    assert flipped not in reverted["images"][0]["present"]
    assert _report_row(_sr(runtime, third, "report"), flipped)[0] == "Absent"
