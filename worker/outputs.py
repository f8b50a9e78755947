"""The result objects a study gets (SR, report, heatmap SC, GSPS; or a not-analysed report): their UIDs,
series numbers, building and writing. One output's failure costs that output only."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset

from service.core.settings import AnyDestination
from service.core.status import OutputKind, ReasonCode
from worker import __version__
from worker.dicom.gsps import build_findings_gsps
from worker.dicom.pixels import DisplayImage
from worker.dicom.sc import build_heatmap_sc
from worker.dicom.sr import (
    AlgorithmInfo,
    FindingResult,
    OutputContext,
    build_findings_sr,
    build_not_analysed_sr,
    build_results_sr,
)
from worker.dicom.uids import derive_uid
from worker.inference.bundle import Bundle
from worker.regions import Region

SERIES_NUMBERS = {
    OutputKind.SR: 9901,
    OutputKind.SC: 9902,
    OutputKind.GSPS: 9903,
    OutputKind.REPORT: 9904,
}


@dataclass(frozen=True)
class Output:
    kind: OutputKind
    sop_instance_uid: str
    path: Path
    # The destination output names it is sent for (a not-analysed report stands in for both SRs).
    serves: frozenset[OutputKind] = frozenset()

    def wanted_by(self, dest: AnyDestination) -> bool:
        return bool((self.serves or {self.kind}) & set(dest.outputs))


@dataclass(frozen=True)
class StudyOutputs:
    """Where one study's outputs go and what names them: the same inputs always give the same UIDs."""

    out_dir: Path
    uid_prefix: str
    study_uid: str
    algorithm: AlgorithmInfo

    def series_uid(self, kind: OutputKind | str) -> str:
        return derive_uid(self.uid_prefix, self.study_uid, self.algorithm.version, f"{kind}-series")


def algorithm_info(bundle: Bundle) -> AlgorithmInfo:
    return AlgorithmInfo(
        name=bundle.name,
        version=bundle.version,
        bundle_hash=bundle.sha256,
        software_version=f"cxr-gateway {__version__}",
        calibrated=bundle.calibrated,
    )


def write(ds: Dataset, path: Path) -> Path:
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


def explained(reason: str) -> str:
    text = next((t for code, t in _REASON_TEXTS.items() if code.value == reason), None)
    return f"{reason} ({text})" if text else reason


def not_analysed_output(received: list[Dataset], reasons: dict[str, str], study: StudyOutputs) -> Output:
    """One report for a study none of whose images could be analysed, each instance with its reason."""
    prefix, version = study.uid_prefix, study.algorithm.version
    sr_uid = derive_uid(prefix, study.study_uid, version, "not-analysed-sr")
    ctx = OutputContext(
        algorithm=study.algorithm,
        series_instance_uid=study.series_uid("sr"),
        sop_instance_uid=sr_uid,
        series_number=SERIES_NUMBERS[OutputKind.SR],
    )
    sr = build_not_analysed_sr(received, {uid: explained(reason) for uid, reason in reasons.items()}, ctx)
    path = write(sr, study.out_dir / "not-analysed-sr.dcm")
    return Output(OutputKind.REPORT, sr_uid, path, frozenset({OutputKind.SR, OutputKind.REPORT}))


@dataclass(frozen=True)
class ImageResult:
    """One analysed image as every output uses it (findings at their operating points, regions ordered)."""

    src: Dataset
    display: DisplayImage
    findings: list[FindingResult]
    heatmaps: dict[str, NDArray[np.float32]]
    regions: list[Region]
    # The worklist priority hint of the urgency rules that fire on it (worker.priority), None if none.
    priority: str | None = None


def image_outputs(
    image: ImageResult, n: int, study: StudyOutputs, wanted: set[OutputKind]
) -> tuple[list[Output], dict[OutputKind, str]]:
    """The output objects for the n-th analysed image of a study (UIDs derived, files written), and the
    kinds that could not be built with the error's type: one output's failure costs only that output."""
    outputs: list[Output] = []
    failed: dict[OutputKind, str] = {}
    for kind, build in _builders(image).items():
        # SR, report and SC always (the dashboard shows the SC); a GSPS only for a destination that asks.
        if kind == OutputKind.GSPS and kind not in wanted:
            continue
        sop_uid = derive_uid(
            study.uid_prefix, str(image.src.SOPInstanceUID), study.algorithm.version, str(kind)
        )
        try:
            ds = build(
                OutputContext(
                    algorithm=study.algorithm,
                    series_instance_uid=study.series_uid(kind),
                    sop_instance_uid=sop_uid,
                    series_number=SERIES_NUMBERS[kind],
                    instance_number=n,
                )
            )
        except Exception as exc:  # a builder's bug or an input it cannot take: this output only
            failed[kind] = type(exc).__name__
            continue
        outputs.append(Output(kind, sop_uid, write(ds, study.out_dir / f"{kind}-{n}.dcm")))
    return outputs, failed


def _builders(image: ImageResult) -> dict[OutputKind, Callable[[OutputContext], Dataset]]:
    src, findings, regions = image.src, image.findings, image.regions
    return {
        OutputKind.SR: lambda ctx: build_findings_sr(
            src, findings, ctx, regions=regions, priority=image.priority
        ),
        OutputKind.REPORT: lambda ctx: build_results_sr(src, findings, ctx),
        OutputKind.SC: lambda ctx: build_heatmap_sc(
            src, image.display.pixels, image.heatmaps, findings, regions, ctx
        ),
        OutputKind.GSPS: lambda ctx: build_findings_gsps(
            src, regions, findings, ctx, pixels_inverted=image.display.inverted_by_heuristic
        ),
    }
