"""Hostile images through the worker pipeline: limits before decoding, and pixels that are no image.

Each ends the job skipped with a coded reason and a valid "not analysed" SR that says why; the worker
process itself never pays for the image (its peak RSS stays where it was).
"""

from __future__ import annotations

import resource
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from sqlalchemy import select

from service.core.models import Delivery, Job
from service.core.status import JobStatus, ReasonCode
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.hostile import chest_cr, save, with_bomb
from tests.support.runtime import worker_runtime
from tests.support.studies import enqueue_files
from worker.pipeline import process_study
from worker.runtime import Runtime


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    with worker_runtime(tmp_path / "data") as rt:
        rt.predictor  # noqa: B018  (the model's memory is not the image's: load it before measuring)
        yield rt


def _run(rt: Runtime, path: Path) -> tuple[Job, str]:
    job_id = enqueue_files(rt, [path])
    process_study(job_id, rt)
    with rt.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        (delivery,) = s.scalars(select(Delivery).where(Delivery.job_id == job_id))
        report = rt.settings.output_dir / delivery.output_path
    assert dciodvfy_errors(report) == []
    text = "\n".join(
        str(element.value) for element in pydicom.dcmread(report).iterall() if element.keyword == "TextValue"
    )
    return job, text


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.parametrize(
    ("rows", "header", "reason"),
    [
        # Before: the worker reserved 8.2 GiB (VmPeak) for this one.
        (65000, None, ReasonCode.IMAGE_TOO_LARGE),
        # Before: decoded to a blank image at 4.1 GB RSS, then analysed.
        (12000, None, ReasonCode.IMAGE_TOO_LARGE),
        # Before: 10.9 s and 8.5 GB RSS inside the worker.
        (65000, (512, 512), ReasonCode.PIXEL_MODULE_INCONSISTENT),
    ],
)
def test_a_decompression_bomb_is_refused_without_costing_the_worker(
    runtime: Runtime, tmp_path: Path, shared_dir: Path, rows: int, header: tuple[int, int] | None, reason: str
) -> None:
    bomb = save(with_bomb(chest_cr(), rows, rows, header=header), tmp_path / "bomb.dcm")
    before = _peak_rss_mb()
    job, text = _run(runtime, bomb)
    assert (job.status, job.reason_code) == (JobStatus.SKIPPED, reason)
    assert reason in text
    assert _peak_rss_mb() - before < 150


def test_a_bomb_past_raised_header_limits_still_costs_only_the_decoder(
    runtime: Runtime, tmp_path: Path, shared_dir: Path
) -> None:
    """With max_image_pixels raised, the decoder's address-space limit is what holds."""
    runtime.settings.max_image_pixels = 10**9
    runtime.settings.decode_memory_limit_bytes = 1024**3
    bomb = save(with_bomb(chest_cr(), 12000, 12000), tmp_path / "bomb.dcm")
    before = _peak_rss_mb()
    job, _ = _run(runtime, bomb)
    assert job.status == JobStatus.SKIPPED
    assert job.reason_code in {ReasonCode.PIXEL_DECODE_MEMORY, ReasonCode.PIXEL_DECODE_ERROR}
    assert _peak_rss_mb() - before < 150


def test_an_instance_over_the_byte_limit_is_not_read(
    runtime: Runtime, tmp_path: Path, shared_dir: Path
) -> None:
    runtime.settings.max_instance_bytes = 100_000
    job, text = _run(runtime, save(chest_cr(), tmp_path / "big.dcm"))  # 512 x 512 x 2 bytes
    assert (job.status, job.reason_code) == (JobStatus.SKIPPED, ReasonCode.INSTANCE_TOO_LARGE)
    assert "instance_too_large" in text


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"RescaleSlope": "NaN", "RescaleIntercept": "0"}, ReasonCode.RESCALE_INVALID),
        ({"RescaleSlope": "0", "RescaleIntercept": "0"}, ReasonCode.RESCALE_INVALID),
        ({"WindowCenter": "2048", "WindowWidth": "0"}, ReasonCode.WINDOW_INVALID),
        ({"WindowCenter": "90000", "WindowWidth": "10"}, ReasonCode.IMAGE_BLANK),
    ],
)
def test_pixels_that_are_no_image_are_not_analysed(
    runtime: Runtime, tmp_path: Path, shared_dir: Path, attrs: dict[str, str], reason: str
) -> None:
    """Before: RescaleSlope NaN gave a job `done` with 8 findings present on a blank image."""
    ds = chest_cr()
    for keyword, value in attrs.items():
        ds.add_new(keyword, pydicom.datadict.dictionary_VR(keyword), value)
    job, text = _run(runtime, save(ds, tmp_path / "image.dcm"))
    assert (job.status, job.reason_code) == (JobStatus.SKIPPED, reason)
    assert job.result is not None and not job.result.get("images")
    assert reason in text


def test_an_instance_whose_uid_is_invalid_gets_no_output(
    runtime: Runtime, tmp_path: Path, shared_dir: Path
) -> None:
    """A leading-zero UID passes the listener's syntax check but no valid output could reference it."""
    ds = chest_cr()
    ds.SOPInstanceUID = "1.2.03.4"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    job_id = enqueue_files(runtime, [save(ds, tmp_path / "image.dcm")])
    assert process_study(job_id, runtime) == []
    with runtime.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.status, job.reason_code) == (JobStatus.FAILED, ReasonCode.INVALID_UIDS)
        assert s.scalars(select(Delivery).where(Delivery.job_id == job_id)).all() == []
