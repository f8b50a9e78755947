"""The worker pipeline as a plain function on real spooled files and a real SQLite database."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from service.core.db import make_session_factory, migrate
from service.core.models import Delivery, Job, JobEvent
from service.core.settings import Destination, load_settings
from service.core.status import JobStatus, ReasonCode
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.runtime import worker_runtime
from tests.support.studies import enqueue_files
from worker.pipeline import process_study
from worker.runtime import Runtime


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    with worker_runtime(tmp_path) as rt:
        yield rt


def test_chest_study_gives_reports_sc_and_deliveries(runtime: Runtime, shared_dir: Path) -> None:
    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/cr-pa-mono1-j2k-lossless.dcm"])
    delivery_ids = process_study(job_id, runtime)
    assert len(delivery_ids) == 3  # measurement SR + results SR + SC to one destination
    with runtime.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == JobStatus.DONE
        assert job.result is not None
        image = job.result["images"][0]
        assert image["inverted_by_label"] is True
        assert len(image["probabilities"]) == 14
        assert image["score_kind"] == "probability"  # the shipped bundle is Platt-calibrated (its model card)
        assert (image["rows"], image["columns"]) == (1955, 1841)
        assert sorted(r["label"] for r in image["regions"]) == sorted(image["present"])
        for region in image["regions"]:
            assert region["polygon"][0] == region["polygon"][-1]
            assert all(0 <= x <= 1841 and 0 <= y <= 1955 for x, y in region["polygon"])
        kinds = sorted(d.kind for d in s.scalars(select(Delivery)))
        assert kinds == ["report", "sc", "sr"]
        events = s.scalars(select(JobEvent.status).where(JobEvent.job_id == job_id)).all()
        assert events[-2:] == [JobStatus.RUNNING, JobStatus.DONE]
        paths = [runtime.settings.output_dir / d.output_path for d in s.scalars(select(Delivery))]
    for path in paths:
        assert dciodvfy_errors(path) == []
    # Idempotent: the same job again analyses nothing; it hands back the still-pending deliveries.
    assert process_study(job_id, runtime) == delivery_ids


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("cr-tibia-j2k-lossless.dcm", ReasonCode.NOT_CHEST),
        ("dx-canine-lateral-thorax.dcm", ReasonCode.TOO_SMALL),
    ],
)
def test_non_chest_study_is_skipped_with_a_reason_and_a_not_analysed_sr(
    runtime: Runtime, shared_dir: Path, name: str, reason: ReasonCode
) -> None:
    job_id = enqueue_files(runtime, [shared_dir / "dicom/not-chest" / name])
    delivery_ids = process_study(job_id, runtime)
    assert len(delivery_ids) == 1
    with runtime.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert job.status == JobStatus.SKIPPED
        assert job.reason_code == reason
        delivery = s.scalars(select(Delivery)).one()
        assert delivery.kind == "report"  # a text report stands in for both SRs
        out = runtime.settings.output_dir / delivery.output_path
    assert dciodvfy_errors(out) == []
    assert "not for diagnostic use" in str(dcmread(out).SeriesDescription).lower()


def test_a_redelivered_task_reuses_its_delivery_rows(runtime: Runtime, shared_dir: Path) -> None:
    """A worker killed after writing outputs: the task runs again and must not duplicate deliveries."""
    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm"])
    first = process_study(job_id, runtime)
    with runtime.sessions.begin() as s:
        # Pretend the worker died just before marking the job done.
        s.get(Job, job_id).status = JobStatus.RUNNING  # type: ignore[union-attr]
        s.get(Delivery, first[0]).status = "delivered"  # type: ignore[union-attr]
    second = process_study(job_id, runtime)
    assert set(second) == set(first) - {first[0]}
    with runtime.sessions() as s:
        assert len(s.scalars(select(Delivery)).all()) == len(first)


def test_a_finished_job_hands_back_its_undelivered_outputs(runtime: Runtime, shared_dir: Path) -> None:
    """The broker was away when deliveries were enqueued: the retried task must not lose them."""
    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm"])
    first = process_study(job_id, runtime)
    with runtime.sessions.begin() as s:
        s.get(Delivery, first[0]).status = "delivered"  # type: ignore[union-attr]
    assert process_study(job_id, runtime) == first[1:]


def test_a_decode_over_the_time_limit_is_killed_recorded_not_fatal(
    runtime: Runtime, shared_dir: Path
) -> None:
    """A real codec (JPEG 2000, 3.6 Mpx: far longer than 50 ms) is killed at the limit; the job goes on."""
    runtime.settings.decode_timeout_seconds = 0.05
    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/cr-pa-mono1-j2k-lossless.dcm"])
    process_study(job_id, runtime)
    _assert_ran_then_skipped_on_the_decode_limit(runtime, job_id)


def test_studies_run_as_threads_share_forward_passes(tmp_path: Path, shared_dir: Path) -> None:
    """A thread-pool worker (the GPU worker's set-up): concurrent studies batched into shared passes,
    each job still getting exactly its own probabilities."""
    import threading

    from tests.support.studies import with_fresh_uids

    src = shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm"
    files = [with_fresh_uids(src, tmp_path / f"in/{i}.dcm") for i in range(4)]
    settings = load_settings(
        data_dir=tmp_path / "data",
        worker_pool="threads",
        worker_concurrency=4,
        inference_max_batch=8,
        inference_max_wait_ms=2000,  # generous: the four tasks decode at different speeds here
    )
    migrate(settings)
    rt = Runtime(settings=settings, sessions=make_session_factory(settings))
    job_ids = [enqueue_files(rt, [f]) for f in files]
    rt.predictor  # noqa: B018  (load once, before the race)
    start = threading.Barrier(len(job_ids))

    def run(job_id: str) -> None:
        start.wait()
        process_study(job_id, rt)

    threads = [threading.Thread(target=run, args=(j,)) for j in job_ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    rt.close()

    with rt.sessions() as s:
        jobs = [s.get(Job, j) for j in job_ids]
        assert all(j is not None and j.status == JobStatus.DONE for j in jobs)
        results = [j.result for j in jobs if j is not None and j.result is not None]
    shared = [r["inference"] for r in results]
    assert max(i["batch_studies"] for i in shared) > 1, shared
    # On a CPU the shipped bundle runs its checked int8 graph (models/model.int8.onnx).
    assert shared[0]["device"] == "cpu" and shared[0]["precision"] == "int8"
    # The same image in four studies: the same answer whichever pass it rode in.
    probs = [r["images"][0]["probabilities"] for r in results]
    for p in probs[1:]:
        assert p == pytest.approx(probs[0], abs=1e-5)


def test_the_decode_limit_holds_in_a_thread_pool_worker(runtime: Runtime, shared_dir: Path) -> None:
    """No SIGALRM outside the main thread: the decoder process is killed at the limit all the same."""
    import threading

    runtime.settings.decode_timeout_seconds = 0.05
    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/cr-pa-mono1-j2k-lossless.dcm"])
    worker_thread = threading.Thread(target=lambda: process_study(job_id, runtime))
    worker_thread.start()
    worker_thread.join(120)
    assert not worker_thread.is_alive()
    _assert_ran_then_skipped_on_the_decode_limit(runtime, job_id)


def _assert_ran_then_skipped_on_the_decode_limit(rt: Runtime, job_id: str) -> None:
    """The job's recorded history, not the wall clock (a slow machine is no failure): it ran, then was
    skipped for the decode limit, in that order, and nothing came after."""
    with rt.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None
        assert (job.status, job.reason_code) == (JobStatus.SKIPPED, ReasonCode.PIXEL_DECODE_TIMEOUT)
        events = s.execute(
            select(JobEvent.status, JobEvent.reason_code, JobEvent.at)
            .where(JobEvent.job_id == job_id)
            .order_by(JobEvent.id)
        ).all()
    assert [(e.status, e.reason_code) for e in events[-2:]] == [
        (JobStatus.RUNNING, None),
        (JobStatus.SKIPPED, ReasonCode.PIXEL_DECODE_TIMEOUT),
    ]
    assert events[-2].at <= events[-1].at


def test_two_runs_of_one_job_at_once_end_in_one_result(runtime: Runtime, shared_dir: Path) -> None:
    """A second message for a running job (a reconciler's false alarm) runs it twice side by side: the
    runs write the same files and the same rows, and the one that finishes last never overwrites the
    first one's outcome with a failure."""
    import threading

    import worker.pipeline as pipeline

    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/cr-pa-mono1-j2k-lossless.dcm"])
    both_analysed = threading.Barrier(2, timeout=120)
    real_analyse = pipeline.analyse

    def in_step(*args: object, **kwargs: object) -> object:
        out = real_analyse(*args, **kwargs)  # type: ignore[arg-type]
        both_analysed.wait()  # both runs now write their outputs at the same moment
        return out

    results: list[object] = []

    def run() -> None:
        try:
            results.append(process_study(job_id, runtime, worker=threading.current_thread().name))
        except Exception as exc:  # the rows' unique constraint may refuse the slower run: that is fine
            results.append(exc)

    pipeline.analyse = in_step  # type: ignore[assignment]
    try:
        threads = [threading.Thread(target=run, name=f"w{i}") for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=180)
    finally:
        pipeline.analyse = real_analyse
    assert len(results) == 2
    assert not any(isinstance(r, FileNotFoundError) for r in results), results
    with runtime.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == JobStatus.DONE
        assert len(s.scalars(select(Delivery)).all()) == 3
        events = s.scalars(select(JobEvent.status).where(JobEvent.job_id == job_id)).all()
        assert events.count(JobStatus.DONE) == 1 and JobStatus.FAILED not in events
    out_dir = runtime.settings.output_dir / job_id
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["report-1.dcm", "sc-1.dcm", "sr-1.dcm"]  # no temp files left


def test_a_failure_never_overwrites_a_result_another_run_recorded(runtime: Runtime, shared_dir: Path) -> None:
    import worker.pipeline as pipeline
    from service.core.errors import PermanentError
    from service.core.jobs import transition

    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/cr-pa-mono1-j2k-lossless.dcm"])
    real_analyse = pipeline.analyse

    def other_run_finishes_first(*args: object, **kwargs: object) -> object:
        with runtime.sessions.begin() as s:
            transition(s, job_id, JobStatus.DONE)
        raise PermanentError(ReasonCode.INFERENCE_ERROR, "this run failed")

    pipeline.analyse = other_run_finishes_first  # type: ignore[assignment]
    try:
        assert process_study(job_id, runtime) == []
    finally:
        pipeline.analyse = real_analyse
    with runtime.sessions() as s:
        assert s.get(Job, job_id).status == JobStatus.DONE  # type: ignore[union-attr]


def test_each_destination_gets_the_outputs_it_asks_for(tmp_path: Path, shared_dir: Path) -> None:
    settings = load_settings(
        data_dir=tmp_path,
        destinations=[
            Destination(ae_title="PACS", host="127.0.0.1", port=104, outputs=["sr", "report", "sc", "gsps"]),
            Destination(ae_title="VNA", host="127.0.0.1", port=105, outputs=["sc"]),
        ],
    )
    migrate(settings)
    rt = Runtime(settings=settings, sessions=make_session_factory(settings))
    job_id = enqueue_files(rt, [shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm"])
    process_study(job_id, rt)
    with rt.sessions() as s:
        rows = s.scalars(select(Delivery)).all()
        by_peer = {ae: sorted(d.kind for d in rows if d.ae_title == ae) for ae in ("PACS", "VNA")}
        paths = {d.kind: settings.output_dir / d.output_path for d in rows}
    assert by_peer == {"PACS": ["gsps", "report", "sc", "sr"], "VNA": ["sc"]}
    gsps = dcmread(paths["gsps"])
    assert gsps.SOPClassUID == "1.2.840.10008.5.1.4.1.1.11.1"  # Grayscale Softcopy Presentation State
    assert dciodvfy_errors(paths["gsps"]) == []


def test_a_region_that_cannot_be_built_costs_only_the_region(
    runtime: Runtime, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.analysis as analysis

    def broken(*args: object, **kwargs: object) -> object:
        raise ValueError("malformed heatmap")

    monkeypatch.setattr(analysis, "finding_region", broken)
    # Every finding present at a zero operating point, so every one needs a region.
    predictor = runtime.predictor
    points = dict.fromkeys(predictor.bundle.labels, 0.0)
    monkeypatch.setattr(predictor, "bundle", dataclasses.replace(predictor.bundle, operating_points=points))
    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm"])
    assert len(process_study(job_id, runtime)) == 3
    with runtime.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == JobStatus.DONE
        assert job.result is not None
        assert job.result["images"][0]["regions"] == []
        assert {n["reason"] for n in job.result["notes"]} == {ReasonCode.REGION_NOT_BUILT}
        reasons = s.scalars(select(JobEvent.reason_code).where(JobEvent.job_id == job_id)).all()
        assert ReasonCode.REGION_NOT_BUILT in reasons
        sr = next(d for d in s.scalars(select(Delivery)) if d.kind == "sr")
        sr_path = runtime.settings.output_dir / sr.output_path
    assert dciodvfy_errors(sr_path) == []
    assert "Measurement Group" not in str(dcmread(sr_path))  # no group without its region


def test_an_output_that_cannot_be_built_costs_only_that_output(
    runtime: Runtime, shared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import worker.outputs as outputs

    def broken(*args: object, **kwargs: object) -> object:
        raise KeyError("builder bug")

    monkeypatch.setattr(outputs, "build_heatmap_sc", broken)
    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/sc-pa-jpeg-baseline.dcm"])
    assert len(process_study(job_id, runtime)) == 2  # both reports still go to the PACS
    with runtime.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == JobStatus.DONE
        assert job.result is not None
        assert job.result["notes"] == [
            {"image": 1, "output": "sc", "reason": ReasonCode.OUTPUT_BUILD_ERROR, "error": "KeyError"}
        ]
        assert sorted(d.kind for d in s.scalars(select(Delivery))) == ["report", "sr"]
        reasons = s.scalars(select(JobEvent.reason_code).where(JobEvent.job_id == job_id)).all()
        assert ReasonCode.OUTPUT_BUILD_ERROR in reasons

    # Nothing at all could be built: the job fails with the reason, as before.
    for name in ("build_findings_sr", "build_results_sr"):
        monkeypatch.setattr(outputs, name, broken)
    job_id = enqueue_files(runtime, [shared_dir / "dicom/chest/cr-pa-mono1-explicit-le.dcm"])
    assert process_study(job_id, runtime) == []
    with runtime.sessions() as s:
        job = s.get(Job, job_id)
        assert job is not None and job.status == JobStatus.FAILED
        assert job.reason_code == ReasonCode.OUTPUT_BUILD_ERROR
