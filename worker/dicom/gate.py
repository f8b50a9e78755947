"""Header-based input gate: only human frontal chest radiographs reach the network."""

from __future__ import annotations

from dataclasses import dataclass

from pydicom import Dataset
from pydicom.uid import UID

from service.core.status import ReasonCode

IMAGE_SOP_CLASSES = frozenset(
    {
        "1.2.840.10008.5.1.4.1.1.1",  # CR
        "1.2.840.10008.5.1.4.1.1.1.1",  # DX for presentation
        "1.2.840.10008.5.1.4.1.1.1.1.1",  # DX for processing
        "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    }
)
MODALITIES = frozenset({"CR", "DX"})
CHEST_BODY_PARTS = frozenset({"CHEST", "THORAX", "LUNG", "CHEST_LAT", ""})
FRONTAL_VIEWS = frozenset({"PA", "AP", ""})
# Chest radiographs are digitised at 1k-4k pixels a side; below this nothing sensible can be read.
MIN_SIDE = 256


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


def check_header(ds: Dataset) -> GateDecision:
    if UID(str(ds.get("SOPClassUID", ""))) not in IMAGE_SOP_CLASSES or "PixelData" not in ds:
        return GateDecision.reject(ReasonCode.NOT_IMAGE_OBJECT)
    modality = _upper(ds, "Modality")
    if modality not in MODALITIES and not (modality in {"OT", ""} and ds.SOPClassUID.endswith(".7")):
        return GateDecision.reject(ReasonCode.UNSUPPORTED_MODALITY)
    if ds.get("PatientSpeciesDescription") or ds.get("PatientSpeciesCodeSequence"):
        return GateDecision.reject(ReasonCode.NOT_CHEST)
    body_part = _upper(ds, "BodyPartExamined")
    if body_part not in CHEST_BODY_PARTS:
        return GateDecision.reject(ReasonCode.NOT_CHEST)
    view = _upper(ds, "ViewPosition")
    if view not in FRONTAL_VIEWS:
        return GateDecision.reject(ReasonCode.NOT_FRONTAL)
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1 or int(ds.get("NumberOfFrames", 1) or 1) != 1:
        return GateDecision.reject(ReasonCode.NOT_2D_GREY)
    if min(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) < MIN_SIDE:
        return GateDecision.reject(ReasonCode.TOO_SMALL)
    return GateDecision.accept()
