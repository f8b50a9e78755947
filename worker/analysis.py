"""One study's analysis: its admitted images through the model, each image's findings, regions and
outputs, and the result the job records. The study's outcome is a result or a coded PermanentError."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset

from service.core.errors import PermanentError
from service.core.status import OutputKind, ReasonCode
from worker.admission import Admission, admit
from worker.dicom.pixels import DisplayImage
from worker.dicom.sr import FindingResult
from worker.inference.bundle import Bundle
from worker.inference.predictor import Prediction
from worker.outputs import (
    ImageResult,
    Output,
    StudyOutputs,
    algorithm_info,
    image_outputs,
    not_analysed_output,
)
from worker.priority import image_priority
from worker.regions import Region, finding_region
from worker.runtime import Runtime
from worker.site import image_inputs, run_candidates, sync_live_bundle, with_site_thresholds

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Analysis:
    """What a study's analysis leaves: the written outputs, the job's result, and the reason the study was
    skipped (None when an image was analysed)."""

    outputs: list[Output]
    result: dict[str, Any]
    skipped_reason: str | None = None


def analyse(rows: list[tuple[str, Path]], study_uid: str, job_id: str, rt: Runtime) -> Analysis:
    """``rows``: each received instance's SOP Instance UID and spool file. Raises PermanentError when the
    study as a whole cannot be analysed (no readable instance, the model failed, no output built)."""
    sync_live_bundle(rt)
    # The site's operating points (service.site.operating_points) decide Present/Absent everywhere.
    bundle, points = with_site_thresholds(rt, rt.bundle)
    study = StudyOutputs(
        rt.settings.output_dir / job_id, rt.settings.uid_prefix, study_uid, algorithm_info(bundle)
    )
    admission = admit(rows, job_id, rt)
    result: dict[str, Any] = {
        "bundle": {"name": bundle.name, "version": bundle.version},
        "operating_points": points,
        "images": [],
    }
    if not admission.eligible:
        return _not_analysed(admission, study, result)
    prediction = _predict(rt, admission.eligible)
    result["inference"] = {
        **rt.predictor.description,
        # Shared with other studies when the worker batches: how full the GPU's pass was.
        "batch_images": prediction.batch_images,
        "batch_studies": prediction.batch_requests,
    }
    wanted = {kind for dest in rt.settings.destinations for kind in dest.outputs}
    outputs: list[Output] = []
    notes: list[dict[str, Any]] = []  # what went wrong without costing the job, each with a coded reason
    for n, ((src, display), scores, cams) in enumerate(
        zip(admission.eligible, prediction.probabilities, prediction.cams, strict=True), start=1
    ):
        image = _image_result(bundle, src, display, scores, cams, n, job_id, notes)
        entry = _image_json(image, calibrated=study.algorithm.calibrated)
        image = replace(image, priority=image_priority(rt.settings.notify_rules, entry, result["bundle"]))
        built = _image_outputs(image, n, study, wanted, job_id, notes)
        outputs.extend(built)
        result["images"].append(entry)
    result["gate"] = admission.reasons
    run_candidates(rt, job_id, [str(src.SOPInstanceUID) for src, _ in admission.eligible], _pixels(admission))
    if notes:
        result["notes"] = notes
    result["finished_at"] = datetime.now(UTC).isoformat()
    return Analysis(outputs, result)


def _not_analysed(admission: Admission, study: StudyOutputs, result: dict[str, Any]) -> Analysis:
    """No image could be analysed: a report that says why, or a failure when nothing could even be read."""
    if not admission.received:
        cause = next((str(r) for r in admission.gate.values() if r), ReasonCode.NO_IMAGES)
        raise PermanentError(cause, "no readable instance in the study")
    reasons = admission.reasons
    output = not_analysed_output(admission.received, reasons, study)
    result["gate"] = reasons
    return Analysis([output], result, next(iter(reasons.values()), ReasonCode.NO_IMAGES))


def _pixels(admission: Admission) -> list[NDArray[np.float32]]:
    return [display.pixels for _, display in admission.eligible]


def _predict(rt: Runtime, eligible: list[tuple[Dataset, DisplayImage]]) -> Prediction:
    try:
        return rt.predictor.predict([display.pixels for _, display in eligible])
    except Exception as exc:  # a bad tensor is this job's problem, not the worker's
        raise PermanentError(ReasonCode.INFERENCE_ERROR, type(exc).__name__) from exc


def _image_result(
    bundle: Bundle,
    src: Dataset,
    display: DisplayImage,
    scores: NDArray[np.float32],
    cams: NDArray[np.float32],
    n: int,
    job_id: str,
    notes: list[dict[str, Any]],
) -> ImageResult:
    findings, heatmaps, regions, unlocalised = image_findings(bundle, scores, cams, display.pixels.shape)
    for label in unlocalised:
        log.warning("job=%s image=%d finding=%s reason=%s", job_id, n, label, ReasonCode.REGION_NOT_BUILT)
        notes.append({"image": n, "label": label, "reason": ReasonCode.REGION_NOT_BUILT})
    return ImageResult(src, display, findings, heatmaps, regions)


def _image_outputs(
    image: ImageResult,
    n: int,
    study: StudyOutputs,
    wanted: set[OutputKind],
    job_id: str,
    notes: list[dict[str, Any]],
) -> list[Output]:
    built, failed = image_outputs(image, n, study, wanted)
    for kind, error in failed.items():
        log.warning("job=%s image=%d output=%s reason=%s", job_id, n, kind, ReasonCode.OUTPUT_BUILD_ERROR)
        notes.append(
            {"image": n, "output": str(kind), "reason": ReasonCode.OUTPUT_BUILD_ERROR, "error": error}
        )
    if not built:
        raise PermanentError(ReasonCode.OUTPUT_BUILD_ERROR, ", ".join(sorted(set(failed.values()))))
    return built


def _image_json(image: ImageResult, *, calibrated: bool) -> dict[str, Any]:
    height, width = image.display.pixels.shape
    findings = image.findings
    return {
        "sop_instance_uid": str(image.src.SOPInstanceUID),
        "probabilities": {f.label: round(f.score, 6) for f in findings},
        "present": [f.label for f in findings if f.present],
        "score_kind": "probability" if calibrated else "score",
        "rows": int(height),
        "columns": int(width),
        "regions": [region.as_json() for region in image.regions],
        "inverted_by_label": image.display.inverted_by_label,
        "inverted_by_heuristic": image.display.inverted_by_heuristic,
        "inputs": image_inputs(image.src),  # for drift (service.site.drift)
    }


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
