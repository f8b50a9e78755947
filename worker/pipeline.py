"""Plain functions behind the Celery tasks: one study in, result objects and delivery rows out."""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.errors import PermanentError
from service.core.jobs import record_event, transition
from service.core.models import Delivery, Instance, Job
from service.core.settings import Destination, Settings
from service.core.status import DeliveryStatus, JobStatus, OutputKind, ReasonCode
from worker import __version__
from worker.dicom.decoder import DecodeLimits, DecodeTimeout, IsolatedDecoder
from worker.dicom.gate import GateRules, SizeLimits, check_header, check_size
from worker.dicom.gsps import build_findings_gsps
from worker.dicom.pixels import DisplayImage, PixelDataError
from worker.dicom.sc import build_heatmap_sc
from worker.dicom.source import SourceHeaderError, source_header
from worker.dicom.sr import (
    AlgorithmInfo,
    FindingResult,
    build_findings_sr,
    build_not_analysed_sr,
    build_results_sr,
)
from worker.dicom.uids import derive_uid
from worker.inference.batcher import BatchingPredictor
from worker.inference.bundle import Bundle, load_bundle
from worker.inference.predictor import Prediction, Predictor
from worker.regions import Region, finding_region

log = logging.getLogger(__name__)

# Header values above this size are read from the spool file only when something asks for them.
_DEFER_BYTES = 64 * 1024

SERIES_NUMBERS = {
    OutputKind.SR: 9901,
    OutputKind.SC: 9902,
    OutputKind.GSPS: 9903,
    OutputKind.REPORT: 9904,
}


class Inference(Protocol):
    """A Predictor, or a BatchingPredictor in front of one."""

    @property
    def bundle(self) -> Bundle: ...

    @property
    def description(self) -> dict[str, str]: ...

    def predict(self, images: Sequence[NDArray[np.float32]]) -> Prediction: ...


@dataclass
class Runtime:
    """What a worker process builds once and reuses across tasks (thread-safe: tasks may be threads)."""

    settings: Settings
    sessions: sessionmaker[Session]
    _predictor: Inference | None = field(default=None, init=False)
    _decoder: IsolatedDecoder | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def predictor(self) -> Inference:
        with self._lock:
            if self._predictor is None:
                self._predictor = make_inference(self.settings)
            return self._predictor

    @property
    def decoder(self) -> IsolatedDecoder:
        """Pixel decoding in limited child processes (started on first use, in the process using it)."""
        with self._lock:
            if self._decoder is None:
                s = self.settings
                self._decoder = IsolatedDecoder(
                    s.tmp_dir / "decode", DecodeLimits(s.decode_timeout_seconds, s.decode_memory_limit_bytes)
                )
            return self._decoder

    def close(self) -> None:
        with self._lock:
            if isinstance(self._predictor, BatchingPredictor):
                self._predictor.close()
            self._predictor = None
            if self._decoder is not None:
                self._decoder.close()
            self._decoder = None

    @property
    def size_limits(self) -> SizeLimits:
        return SizeLimits(self.settings.max_image_pixels, self.settings.max_instance_bytes)

    @property
    def gate_rules(self) -> GateRules:
        s = self.settings
        return GateRules.from_lists(
            s.gate_modalities, s.gate_body_parts, s.gate_view_positions, s.gate_min_side
        )

    @property
    def bundle(self) -> Bundle:
        return self.predictor.bundle


def make_inference(settings: Settings) -> Inference:
    """The worker's predictor, behind a cross-study batcher where tasks share this process."""
    s = settings
    predictor = Predictor(
        load_bundle(s.model_bundle),
        device=s.inference_device,
        threads=s.torch_threads,
        backend=s.inference_backend,
        precision=s.inference_precision,
    )
    log.info(
        "model bundle=%s version=%s device=%s precision=%s backend=%s",
        predictor.bundle.name,
        predictor.bundle.version,
        predictor.device,
        predictor.precision,
        predictor.backend,
    )
    if s.worker_pool == "threads" and s.worker_concurrency > 1 and s.inference_max_batch > 1:
        log.info(
            "batching across studies max_batch=%d max_wait_ms=%.0f",
            s.inference_max_batch,
            s.inference_max_wait_ms,
        )
        return BatchingPredictor(predictor, s.inference_max_batch, s.inference_max_wait_ms / 1000)
    return predictor


@dataclass(frozen=True)
class Output:
    kind: OutputKind
    sop_instance_uid: str
    path: Path
    # The destination output names it is sent for (a not-analysed report stands in for both SRs).
    serves: frozenset[OutputKind] = frozenset()

    def wanted_by(self, dest: Destination) -> bool:
        return bool((self.serves or {self.kind}) & set(dest.outputs))


def algorithm_info(bundle: Bundle) -> AlgorithmInfo:
    return AlgorithmInfo(
        name=bundle.name,
        version=bundle.version,
        bundle_hash=bundle.sha256,
        software_version=f"cxr-gateway {__version__}",
        calibrated=bundle.calibrated,
    )


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp name per writer: two runs of one job (a false alarm of the reconciler) write the same
    # content, and each rename is atomic, but a shared temp file would be pulled from under the other.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


# What the "not analysed" report says beside a reason code: a reader should not need our code list.
_REASON_TEXTS = {
    ReasonCode.NOT_IMAGE_OBJECT: "the instance is not an image (e.g. a report or presentation state)",
    ReasonCode.UNSUPPORTED_MODALITY: "the modality is not a radiograph (CR, DX or a scanned chest film)",
    ReasonCode.NOT_CHEST: "the body part examined is not the chest",
    ReasonCode.NOT_FRONTAL: "the view is not frontal (PA or AP)",
    ReasonCode.NOT_2D_GREY: "the image is not a single-frame greyscale image",
    ReasonCode.TOO_SMALL: "the image is smaller than the algorithm's minimum size",
    ReasonCode.PIXEL_DECODE_ERROR: "the pixel data could not be decoded",
    ReasonCode.SPOOL_FILE_MISSING: "the received file is no longer on the gateway",
    ReasonCode.IMAGE_TOO_LARGE: "Rows x Columns x frames over the gateway's limit",
    ReasonCode.INSTANCE_TOO_LARGE: "the instance is larger than the gateway's limit",
    ReasonCode.PIXEL_DECODE_MEMORY: "decoding needed more memory than the gateway allows",
    ReasonCode.PIXEL_DECODE_TIMEOUT: "decoding took longer than the gateway allows",
    ReasonCode.RESCALE_INVALID: "Rescale Slope/Intercept is not a finite number, or the slope is zero",
    ReasonCode.WINDOW_INVALID: "Window Center/Width is not a usable window",
    ReasonCode.IMAGE_BLANK: "the rendered image is (nearly) one grey: no anatomy to analyse",
    ReasonCode.DYNAMIC_RANGE_ABSURD: "the pixel values span more than any detector produces",
    ReasonCode.PIXEL_MODULE_INCONSISTENT: "the Image Pixel module contradicts itself or the pixel data",
    ReasonCode.DATASET_MALFORMED: "the header cannot be read",
}


def _explained(reason: str) -> str:
    text = next((t for code, t in _REASON_TEXTS.items() if code.value == reason), None)
    return f"{reason} ({text})" if text else reason


# The states a run may finish a job from: a job that is already done, failed, skipped or cancelled keeps
# that outcome (another run of it got there first, or an admin cancelled it).
UNFINISHED = (JobStatus.QUEUED, JobStatus.RUNNING)


def process_study(job_id: str, rt: Runtime, worker: str | None = None) -> list[int]:
    """Run one job; returns the ids of the delivery rows to send. Idempotent per job.

    ``worker``: the Celery node running it, whose heartbeat tells the reconciler if it dies mid-job.
    """
    settings = rt.settings
    with rt.sessions.begin() as session:
        job = session.get(Job, job_id)
        if job is None:
            raise PermanentError(ReasonCode.INTERNAL_ERROR, "unknown job")
        if JobStatus(job.status).is_final:
            # A redelivered task (worker died, or the broker was away when deliveries were sent):
            # hand back what is still undelivered instead of analysing again.
            pending = session.scalars(
                select(Delivery.id).where(
                    Delivery.job_id == job_id, Delivery.status == DeliveryStatus.PENDING
                )
            ).all()
            log.info("job=%s already %s; %d deliveries pending", job_id, job.status, len(pending))
            return list(pending)
        transition(session, job_id, JobStatus.RUNNING, reason_code=None)
        job.attempts += 1
        job.worker = worker
        instances = session.scalars(
            select(Instance).where(Instance.study_id == job.study_id).order_by(Instance.id)
        ).all()
        study_uid = job.study.study_instance_uid
        rows = [(i.sop_instance_uid, settings.spool_dir / i.spool_path) for i in instances]

    try:
        outputs, result, skipped_reason = _analyse(rows, study_uid, job_id, rt)
    except PermanentError as exc:
        with rt.sessions.begin() as session:
            transition(
                session,
                job_id,
                JobStatus.FAILED,
                expected=UNFINISHED,
                reason_code=exc.reason,
                reason_detail=exc.detail,
            )
        log.warning("job=%s failed reason=%s", job_id, exc.reason)
        return []

    with rt.sessions.begin() as session:
        job = session.get(Job, job_id)
        assert job is not None
        job.result = result
        job.bundle_version = rt.bundle.version
        # A task redelivered after a worker died finds the rows of its first run: reuse them.
        existing = {
            (d.sop_instance_uid, d.ae_title, d.host, d.port): d
            for d in session.scalars(select(Delivery).where(Delivery.job_id == job_id))
        }
        delivery_ids: list[int] = []
        for out in outputs:
            for dest in settings.destinations:
                if not out.wanted_by(dest):
                    continue
                delivery = existing.get((out.sop_instance_uid, dest.ae_title, dest.host, dest.port))
                if delivery is None:
                    delivery = Delivery(
                        job_id=job_id,
                        ae_title=dest.ae_title,
                        host=dest.host,
                        port=dest.port,
                        sop_instance_uid=out.sop_instance_uid,
                        kind=out.kind,
                        output_path=str(out.path.relative_to(settings.output_dir)),
                        status=DeliveryStatus.PENDING,
                        next_attempt_at=datetime.now(UTC),  # due now: sent by the task or the listener
                    )
                    session.add(delivery)
                    session.flush()
                elif delivery.status == DeliveryStatus.DELIVERED:
                    continue
                delivery_ids.append(delivery.id)
        final = JobStatus.SKIPPED if skipped_reason else JobStatus.DONE
        # Never over a result another run of the same job has already recorded.
        if transition(session, job_id, final, expected=UNFINISHED, reason_code=skipped_reason):
            for reason in sorted({str(note["reason"]) for note in result.get("notes", [])}):
                record_event(session, job_id, final, reason)
    log.info("job=%s %s outputs=%d deliveries=%d", job_id, final, len(outputs), len(delivery_ids))
    return delivery_ids


def _analyse(
    rows: list[tuple[str, Path]], study_uid: str, job_id: str, rt: Runtime
) -> tuple[list[Output], dict[str, Any], str | None]:
    settings = rt.settings
    bundle = rt.bundle
    algo = algorithm_info(bundle)
    out_dir = settings.output_dir / job_id
    prefix = settings.uid_prefix

    gate: dict[str, str | None] = {}
    eligible: list[tuple[Dataset, Any]] = []
    received: list[Dataset] = []
    for sop_uid, path in rows:
        if not path.is_file():
            gate[sop_uid] = ReasonCode.SPOOL_FILE_MISSING
            continue
        try:
            # Large values (the pixel data) stay on disk: the decoder child reads them, not this process.
            ds = dcmread(path, defer_size=_DEFER_BYTES)
            decision = check_size(ds, path.stat().st_size, rt.size_limits)
            if decision.eligible:
                decision = check_header(ds, rt.gate_rules)
        except Exception as exc:  # a header pydicom cannot read costs this instance, not the study
            log.warning(
                "job=%s instance unreadable reason=%s error=%s",
                job_id,
                ReasonCode.DATASET_MALFORMED,
                type(exc).__name__,
            )
            gate[sop_uid] = ReasonCode.DATASET_MALFORMED
            continue
        try:
            source_header(ds)  # an instance no output may reference is left out of every output
        except SourceHeaderError as exc:
            gate[sop_uid] = exc.reason
            continue
        received.append(ds)
        if not decision.eligible:
            gate[sop_uid] = decision.reason
            continue
        try:
            display = rt.decoder.decode(path)
        except PixelDataError as exc:
            gate[sop_uid] = exc.reason
            continue
        except DecodeTimeout:
            gate[sop_uid] = ReasonCode.PIXEL_DECODE_TIMEOUT
            continue
        gate[sop_uid] = None
        eligible.append((ds, display))

    images: list[dict[str, Any]] = []
    result: dict[str, Any] = {"bundle": {"name": bundle.name, "version": bundle.version}, "images": images}
    outputs: list[Output] = []
    notes: list[dict[str, Any]] = []  # what went wrong without costing the job, each with a coded reason

    if not eligible:
        if not received:
            cause = next((str(r) for r in gate.values() if r), ReasonCode.NO_IMAGES)
            raise PermanentError(cause, "no readable instance in the study")
        reasons = {uid: str(r) for uid, r in gate.items() if r}
        texts = {uid: _explained(r) for uid, r in reasons.items()}
        sr_uid = derive_uid(prefix, study_uid, bundle.version, "not-analysed-sr")
        sr = build_not_analysed_sr(
            received,
            texts,
            algo,
            series_instance_uid=derive_uid(prefix, study_uid, bundle.version, "sr-series"),
            sop_instance_uid=sr_uid,
            series_number=SERIES_NUMBERS[OutputKind.SR],
        )
        path = _write(sr, out_dir / "not-analysed-sr.dcm")
        outputs.append(Output(OutputKind.REPORT, sr_uid, path, frozenset({OutputKind.SR, OutputKind.REPORT})))
        result["gate"] = reasons
        first = next(iter(reasons.values()), ReasonCode.NO_IMAGES)
        return outputs, result, first

    try:
        prediction = rt.predictor.predict([display.pixels for _, display in eligible])
    except Exception as exc:  # a bad tensor is this job's problem, not the worker's
        raise PermanentError(ReasonCode.INFERENCE_ERROR, type(exc).__name__) from exc
    result["inference"] = {
        **rt.predictor.description,
        # Shared with other studies when the worker batches: how full the GPU's pass was.
        "batch_images": prediction.batch_images,
        "batch_studies": prediction.batch_requests,
    }

    wanted = {kind for dest in settings.destinations for kind in dest.outputs}
    for n, ((src, display), scores, cams) in enumerate(
        zip(eligible, prediction.probabilities, prediction.cams, strict=True), start=1
    ):
        findings, heatmaps, regions, unlocalised = image_findings(bundle, scores, cams, display.pixels.shape)
        for label in unlocalised:
            log.warning("job=%s image=%d finding=%s reason=%s", job_id, n, label, ReasonCode.REGION_NOT_BUILT)
            notes.append({"image": n, "label": label, "reason": ReasonCode.REGION_NOT_BUILT})
        built, failed = _image_outputs(
            src, display, findings, regions, heatmaps, rt, study_uid, n, out_dir, wanted
        )
        for kind, error in failed.items():
            log.warning("job=%s image=%d output=%s reason=%s", job_id, n, kind, ReasonCode.OUTPUT_BUILD_ERROR)
            notes.append(
                {"image": n, "output": str(kind), "reason": ReasonCode.OUTPUT_BUILD_ERROR, "error": error}
            )
        if not built:
            raise PermanentError(ReasonCode.OUTPUT_BUILD_ERROR, ", ".join(sorted(set(failed.values()))))
        outputs.extend(built)
        height, width = display.pixels.shape
        images.append(
            {
                "sop_instance_uid": str(src.SOPInstanceUID),
                "probabilities": {f.label: round(f.score, 6) for f in findings},
                "present": [f.label for f in findings if f.present],
                "score_kind": "probability" if algo.calibrated else "score",
                "rows": int(height),
                "columns": int(width),
                "regions": [region.as_json() for region in regions],
                "inverted_by_label": display.inverted_by_label,
                "inverted_by_heuristic": display.inverted_by_heuristic,
            }
        )
    result["gate"] = {uid: r for uid, r in gate.items() if r}
    if notes:
        result["notes"] = notes
    result["finished_at"] = datetime.now(UTC).isoformat()
    return outputs, result, None


def image_findings(
    bundle: Bundle, scores: NDArray[np.float32], cams: NDArray[np.float32], shape: tuple[int, ...]
) -> tuple[list[FindingResult], dict[str, NDArray[np.float32]], list[Region], list[str]]:
    """One image's model output as the outputs use it: every finding at its operating point, the
    heatmaps by label, the present findings' regions on the image (highest score first, the order
    every output numbers them in), and the present findings left without a region (a region that
    cannot be built costs that region only, never the report)."""
    findings = [
        FindingResult(label=label, score=float(score), threshold=bundle.operating_points[label])
        for label, score in zip(bundle.labels, scores, strict=True)
    ]
    heatmaps = dict(zip(bundle.labels, cams, strict=True))
    rows, columns = int(shape[0]), int(shape[1])
    regions: list[Region] = []
    missing: list[str] = []
    for finding in findings:
        if not finding.present:
            continue
        try:
            region = finding_region(finding.label, heatmaps[finding.label], rows, columns)
        except Exception:  # a malformed map is this region's problem, not the report's
            region = None
        if region is None:
            missing.append(finding.label)
        else:
            regions.append(region)
    # One order for every output: region n is the n-th highest-scoring present finding.
    by_label = {finding.label: finding.score for finding in findings}
    regions.sort(key=lambda region: -by_label[region.label])
    return findings, heatmaps, regions, missing


def _image_outputs(
    src: Dataset,
    display: DisplayImage,
    findings: list[FindingResult],
    regions: list[Region],
    heatmaps: dict[str, NDArray[np.float32]],
    rt: Runtime,
    study_uid: str,
    n: int,
    out_dir: Path,
    wanted: set[OutputKind],
) -> tuple[list[Output], dict[OutputKind, str]]:
    """The output objects for the n-th analysed image of a study (UIDs derived, files written), and the
    kinds that could not be built with the error's type: one output's failure costs only that output."""
    prefix, version = rt.settings.uid_prefix, rt.bundle.version
    algo = algorithm_info(rt.bundle)
    src_uid = str(src.SOPInstanceUID)

    def uids(kind: OutputKind) -> dict[str, Any]:
        return {
            "series_instance_uid": derive_uid(prefix, study_uid, version, f"{kind}-series"),
            "sop_instance_uid": derive_uid(prefix, src_uid, version, str(kind)),
            "series_number": SERIES_NUMBERS[kind],
            "instance_number": n,
        }

    builders: dict[OutputKind, Callable[..., Dataset]] = {
        OutputKind.SR: partial(build_findings_sr, src, findings, algo, regions=regions),
        OutputKind.REPORT: partial(build_results_sr, src, findings, algo),
        OutputKind.SC: partial(build_heatmap_sc, src, display.pixels, heatmaps, findings, regions, algo),
        OutputKind.GSPS: partial(
            build_findings_gsps,
            src,
            regions,
            findings,
            algo,
            pixels_inverted=display.inverted_by_heuristic,
        ),
    }
    outputs: list[Output] = []
    failed: dict[OutputKind, str] = {}
    for kind, build in builders.items():
        # SR, report and SC always (the dashboard shows the SC); a GSPS only for a destination that asks.
        if kind == OutputKind.GSPS and kind not in wanted:
            continue
        ids = uids(kind)
        try:
            ds = build(**ids)
        except Exception as exc:  # a builder's bug or an input it cannot take: this output only
            failed[kind] = type(exc).__name__
            continue
        outputs.append(Output(kind, ids["sop_instance_uid"], _write(ds, out_dir / f"{kind}-{n}.dcm")))
    return outputs, failed
