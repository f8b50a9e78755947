"""Plain functions behind the Celery tasks: one study in, result objects and delivery rows out."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from types import FrameType
from typing import Any, Protocol, TypeVar, cast

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.jobs import transition
from service.core.models import Delivery, Instance, Job
from service.core.settings import Settings
from service.core.status import DeliveryStatus, JobStatus, ReasonCode
from worker import __version__
from worker.dicom.gate import GateRules, check_header
from worker.dicom.pixels import PixelDataError, read_display_pixels
from worker.dicom.sc import build_heatmap_sc
from worker.dicom.sr import AlgorithmInfo, FindingResult, build_findings_sr, build_not_analysed_sr
from worker.dicom.uids import derive_uid
from worker.errors import PermanentError
from worker.inference.batcher import BatchingPredictor
from worker.inference.bundle import Bundle, load_bundle
from worker.inference.predictor import Prediction, Predictor

log = logging.getLogger(__name__)

TOP_HEATMAPS = 3
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902


T = TypeVar("T")


class DecodeTimeout(Exception):
    """A codec ran past its time limit on one image (a decompression bomb or a codec bug)."""


def call_with_time_limit(fn: Callable[[], T], seconds: float) -> T:
    """``fn()``, or DecodeTimeout once it has run ``seconds``.

    In the main thread (prefork and solo workers) SIGALRM interrupts the codec. In a thread-pool
    worker no portable way to interrupt a codec exists: the call runs in a helper thread that is
    abandoned at the limit (it finishes or dies with the process) while the job goes on without it.
    """
    if seconds <= 0:
        return fn()
    if threading.current_thread() is threading.main_thread():
        return _with_alarm(fn, seconds)
    outcome: list[Any] = []

    def _call() -> None:
        try:
            outcome.append((True, fn()))
        except BaseException as exc:  # handed to the waiting task below
            outcome.append((False, exc))

    helper = threading.Thread(target=_call, name="decode", daemon=True)
    helper.start()
    helper.join(seconds)
    if not outcome:
        raise DecodeTimeout
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast(T, value)


def _with_alarm(fn: Callable[[], T], seconds: float) -> T:
    def _expire(signum: int, frame: FrameType | None) -> None:
        raise DecodeTimeout

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return fn()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


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
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def predictor(self) -> Inference:
        with self._lock:
            if self._predictor is None:
                self._predictor = make_inference(self.settings)
            return self._predictor

    def close(self) -> None:
        with self._lock:
            if isinstance(self._predictor, BatchingPredictor):
                self._predictor.close()
            self._predictor = None

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
    kind: str  # "sr" | "sc"
    sop_instance_uid: str
    path: Path


def algorithm_info(bundle: Bundle) -> AlgorithmInfo:
    return AlgorithmInfo(
        name=bundle.name,
        version=bundle.version,
        bundle_hash=bundle.sha256,
        software_version=f"cxr-gateway {__version__}",
    )


def _write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temp name per writer: two runs of one job (a false alarm of the reconciler) write the same
    # content, and each rename is atomic, but a shared temp file would be pulled from under the other.
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    ds.save_as(tmp, enforce_file_format=True)
    tmp.replace(path)
    return path


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
                    )
                    session.add(delivery)
                    session.flush()
                elif delivery.status == DeliveryStatus.DELIVERED:
                    continue
                delivery_ids.append(delivery.id)
        final = JobStatus.SKIPPED if skipped_reason else JobStatus.DONE
        # Never over a result another run of the same job has already recorded.
        transition(session, job_id, final, expected=UNFINISHED, reason_code=skipped_reason)
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
        ds = dcmread(path)
        received.append(ds)
        decision = check_header(ds, rt.gate_rules)
        if not decision.eligible:
            gate[sop_uid] = decision.reason
            continue
        try:
            display = call_with_time_limit(partial(read_display_pixels, ds), settings.decode_timeout_seconds)
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

    if not eligible:
        if not received:
            raise PermanentError(ReasonCode.NO_IMAGES, "no readable instance in the study")
        reasons = {uid: str(r) for uid, r in gate.items() if r}
        sr_uid = derive_uid(prefix, study_uid, bundle.version, "not-analysed-sr")
        sr = build_not_analysed_sr(
            received,
            reasons,
            algo,
            series_instance_uid=derive_uid(prefix, study_uid, bundle.version, "sr-series"),
            sop_instance_uid=sr_uid,
            series_number=SR_SERIES_NUMBER,
        )
        outputs.append(Output("sr", sr_uid, _write(sr, out_dir / "not-analysed-sr.dcm")))
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

    labels = bundle.labels
    for n, ((src, display), probs, cams) in enumerate(
        zip(eligible, prediction.probabilities, prediction.cams, strict=True), start=1
    ):
        src_uid = str(src.SOPInstanceUID)
        findings = [
            FindingResult(label=lb, probability=float(p), threshold=bundle.operating_points[lb])
            for lb, p in zip(labels, probs, strict=True)
        ]
        top = sorted(range(len(labels)), key=lambda i: float(probs[i]), reverse=True)[:TOP_HEATMAPS]
        try:
            sr_uid = derive_uid(prefix, src_uid, bundle.version, "sr")
            sr = build_findings_sr(
                [src],
                findings,
                algo,
                series_instance_uid=derive_uid(prefix, study_uid, bundle.version, "sr-series"),
                sop_instance_uid=sr_uid,
                series_number=SR_SERIES_NUMBER,
                instance_number=n,
            )
            sc_uid = derive_uid(prefix, src_uid, bundle.version, "sc")
            sc = build_heatmap_sc(
                src,
                display.pixels,
                {labels[i]: cams[i] for i in top},
                {labels[i]: float(probs[i]) for i in top},
                algo,
                series_instance_uid=derive_uid(prefix, study_uid, bundle.version, "sc-series"),
                sop_instance_uid=sc_uid,
                series_number=SC_SERIES_NUMBER,
                instance_number=n,
            )
        except Exception as exc:
            raise PermanentError(ReasonCode.OUTPUT_BUILD_ERROR, type(exc).__name__) from exc
        outputs.append(Output("sr", sr_uid, _write(sr, out_dir / f"sr-{n}.dcm")))
        outputs.append(Output("sc", sc_uid, _write(sc, out_dir / f"sc-{n}.dcm")))
        images.append(
            {
                "sop_instance_uid": src_uid,
                "probabilities": {lb: round(float(p), 6) for lb, p in zip(labels, probs, strict=True)},
                "present": [f.label for f in findings if f.probability >= f.threshold],
                "inverted_by_label": display.inverted_by_label,
                "inverted_by_heuristic": display.inverted_by_heuristic,
            }
        )
    result["gate"] = {uid: r for uid, r in gate.items() if r}
    result["finished_at"] = datetime.now(UTC).isoformat()
    return outputs, result, None
