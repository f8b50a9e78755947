"""Header-based input gate: only human frontal chest radiographs reach the network.

Shared by the worker (``worker.pipeline``, through ``worker.dicom.gate``) and by training on a hospital's
DICOM folders (``monai_train.dicom_folder``), so both accept and refuse the same images for the same coded
reasons. Headers only: no pixel data is decoded here, and no torch or monai is imported.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from pydicom import Dataset

from service.core.status import ReasonCode

IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # CR
        "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture (digitised film, scanned or exported CXRs)
    }
)
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@dataclass(frozen=True)
class GateRules:
    modalities: frozenset[str] = frozenset({"CR", "DX"})
    body_parts: frozenset[str] = frozenset({"CHEST", "THORAX", "LUNG", ""})
    view_positions: frozenset[str] = frozenset({"PA", "AP", ""})
    # Chest radiographs are digitised at 1k-4k pixels a side; below this nothing sensible can be read.
    min_side: int = 256

    @classmethod
    def from_lists(
        cls,
        modalities: Iterable[str],
        body_parts: Iterable[str],
        view_positions: Iterable[str],
        min_side: int,
    ) -> GateRules:
        def norm(values: Iterable[str]) -> frozenset[str]:
            return frozenset(v.strip().upper() for v in values)

        return cls(norm(modalities), norm(body_parts), norm(view_positions), min_side)


@dataclass(frozen=True)
class GateDecision:
    eligible: bool
    reason: str | None = None  # a ReasonCode value when not eligible

    @classmethod
    def accept(cls) -> GateDecision:
        return cls(True)

    @classmethod
    def reject(cls, reason: ReasonCode) -> GateDecision:
        return cls(False, str(reason))


def _upper(ds: Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip().upper()


def check_header(ds: Dataset, rules: GateRules | None = None) -> GateDecision:
    rules = rules or GateRules()
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class not in IMAGE_SOP_CLASSES or "PixelData" not in ds:
        return GateDecision.reject(ReasonCode.NOT_IMAGE_OBJECT)
    modality = _upper(ds, "Modality")
    # A Secondary Capture of a chest film often says OT or nothing: let the other rules decide.
    sc_without_modality = sop_class == SECONDARY_CAPTURE and modality in {"OT", ""}
    if modality not in rules.modalities and not sc_without_modality:
        return GateDecision.reject(ReasonCode.UNSUPPORTED_MODALITY)
    # Veterinary images carry a species (PS3.3 C.7.1.1); humans do not.
    if ds.get("PatientSpeciesDescription") or ds.get("PatientSpeciesCodeSequence"):
        return GateDecision.reject(ReasonCode.NOT_CHEST)
    if _upper(ds, "BodyPartExamined") not in rules.body_parts:
        return GateDecision.reject(ReasonCode.NOT_CHEST)
    if _upper(ds, "ViewPosition") not in rules.view_positions:
        return GateDecision.reject(ReasonCode.NOT_FRONTAL)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return GateDecision.reject(ReasonCode.NOT_2D_GREY)
    if min(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) < rules.min_side:
        return GateDecision.reject(ReasonCode.TOO_SMALL)
    return GateDecision.accept()


@dataclass(frozen=True)
class SizeLimits:
    """Resource limits checked from the header before any decode (settings max_image_pixels and
    max_instance_bytes)."""

    max_image_pixels: int
    max_instance_bytes: int


def check_size(ds: Dataset, file_bytes: int, limits: SizeLimits) -> GateDecision:
    """Refuse an instance whose file or declared pixel matrix is over the limits.

    Only header values are read: the decoder would reserve Rows x Columns x frames samples however few
    bytes encode them (a 105-byte JPEG 2000 stream can declare 65000 x 65000).
    """
    if file_bytes > limits.max_instance_bytes:
        return GateDecision.reject(ReasonCode.INSTANCE_TOO_LARGE)
    try:
        rows = int(ds.get("Rows", 0) or 0)
        columns = int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        return GateDecision.reject(ReasonCode.PIXEL_MODULE_INCONSISTENT)
    if rows < 0 or columns < 0 or frames < 0:
        return GateDecision.reject(ReasonCode.PIXEL_MODULE_INCONSISTENT)
    if rows * columns * max(frames, 1) > limits.max_image_pixels:
        return GateDecision.reject(ReasonCode.IMAGE_TOO_LARGE)
    return GateDecision.accept()
