"""Coded concepts for the 14 NIH ChestX-ray14 findings and the SR vocabulary around them.

Codes come from pydicom's concept dictionary (the DICOM content-mapping resource) where it has
them. Five SNOMED CT codes are not in that dictionary and are written out here: Atelectasis
46621007, Pneumonia 233604007, Lung consolidation 95436008, Pulmonary emphysema 87433001, Hiatal
hernia 84089009. No standard code was found for pleural thickening, so it gets a local code in the
private scheme "99CXR", declared in each SR's Coding Scheme Identification Sequence
(`LOCAL_CODING_SCHEME`).
"""

from __future__ import annotations

from copy import deepcopy
from typing import Final

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from highdicom.sr import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

__all__ = [
    "ABSENT",
    "AI_DISCLAIMER",
    "CHEST_XRAY_PROCEDURE",
    "DISPLAY_NAMES",
    "FINDING",
    "FINDING_CODES",
    "LOCAL_CODING_SCHEME",
    "LOCAL_SCHEME_DESIGNATOR",
    "NIH_LABELS",
    "NO_UNITS",
    "OPERATING_POINT",
    "PERCENT",
    "PRESENT",
    "PROBABILITY",
    "PROCESSING_EQUIPMENT",
    "SCORE_UNIT",
    "XRAY_REPORT",
    "display_name",
    "finding_code",
    "value_concept",
    "value_name",
]

from worker.labels import NIH_LABELS

LOCAL_SCHEME_DESIGNATOR: Final = "99CXR"


def _concept(code: Code) -> CodedConcept:
    return CodedConcept.from_code(code)


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value=value, scheme_designator="SCT", meaning=meaning)


# Vocabulary of the report (TID 1500/1501 items).
FINDING: Final = _concept(codes.DCM.Finding)  # DCM 121071
PROBABILITY: Final = _concept(codes.DCM.Probability)  # DCM 122157
PRESENT: Final = _concept(codes.SCT.Present)  # SCT 52101004
ABSENT: Final = _concept(codes.SCT.Absent)  # SCT 272519000
NO_UNITS: Final = _concept(codes.UCUM.NoUnits)  # UCUM "1"
# Viewers print the unit's code value after the number: "%" for probabilities, the UCUM annotation
# "{score}" (dimensionless) for uncalibrated outputs, where "1" would read as a number.
PERCENT: Final = CodedConcept(value="%", scheme_designator="UCUM", meaning="percent")
SCORE_UNIT: Final = CodedConcept(value="{score}", scheme_designator="UCUM", meaning="score")
# Document title of the results report: CID 7000 (TID 2000), so viewers show it as text.
XRAY_REPORT: Final = _concept(codes.cid7000.XRayReport)  # LN 43468-8
IMPRESSION: Final = _concept(codes.DCM.Impression)  # DCM 121073
# Contributing Equipment purpose: CID 7005 has no "Processing Algorithm" concept (and highdicom only
# accepts CID 7005 codes), so the algorithm is declared as Processing Equipment (DCM 109102).
PROCESSING_EQUIPMENT: Final = _concept(codes.DCM.ProcessingEquipment)
# Procedure reported describes the imaging exam, not the algorithm (IHE AIR). SCT 399208008 is not
# in pydicom's dictionary; CID 100 is extensible, and "XR Chest 2 Views" (LOINC 36643-5) would be
# wrong for a single PA/AP image.
CHEST_XRAY_PROCEDURE: Final = _sct("399208008", "Plain chest X-ray")

AI_DISCLAIMER: Final = "AI-generated, not for diagnostic use"

LOCAL_CODING_SCHEME: Final = CodingSchemeIdentificationItem(
    designator=LOCAL_SCHEME_DESIGNATOR,
    name="cxr-gateway local finding codes",
    version="1",
    responsible_organization="cxr-gateway",
)

# Shared instances: pass `finding_code(label)` (a copy) into datasets you will modify.
OPERATING_POINT: Final = CodedConcept(
    value="OPERATING_POINT", scheme_designator=LOCAL_SCHEME_DESIGNATOR, meaning="Operating point"
)

FINDING_CODES: Final[dict[str, CodedConcept]] = {
    "Atelectasis": _sct("46621007", "Atelectasis"),
    "Cardiomegaly": _concept(codes.SCT.Cardiomegaly),  # 287272002
    "Effusion": _concept(codes.SCT.PleuralEffusion),  # 60046008
    "Infiltration": _concept(codes.DCM.Infiltrate),  # DCM 112121
    "Mass": _concept(codes.SCT.Mass),  # 4147007
    "Nodule": _concept(codes.SCT.Nodule),  # 27925004
    "Pneumonia": _sct("233604007", "Pneumonia"),
    "Pneumothorax": _concept(codes.SCT.Pneumothorax),  # 36118008
    "Consolidation": _sct("95436008", "Lung consolidation"),
    "Edema": _concept(codes.SCT.PulmonaryEdema),  # 19242006
    "Emphysema": _sct("87433001", "Pulmonary emphysema"),
    "Fibrosis": _concept(codes.SCT.Fibrosis),  # 112674009
    "Pleural_Thickening": CodedConcept(
        value="PLEURAL_THICK", scheme_designator=LOCAL_SCHEME_DESIGNATOR, meaning="Pleural thickening"
    ),
    "Hernia": _sct("84089009", "Hiatal hernia"),
}

DISPLAY_NAMES: Final[dict[str, str]] = {
    "Atelectasis": "Atelectasis",
    "Cardiomegaly": "Cardiomegaly",
    "Effusion": "Pleural effusion",
    "Infiltration": "Infiltration",
    "Mass": "Mass",
    "Nodule": "Nodule",
    "Pneumonia": "Pneumonia",
    "Pneumothorax": "Pneumothorax",
    "Consolidation": "Consolidation",
    "Edema": "Edema",
    "Emphysema": "Emphysema",
    "Fibrosis": "Fibrosis",
    "Pleural_Thickening": "Pleural thickening",
    "Hernia": "Hernia",
}


def finding_code(label: str) -> CodedConcept:
    """A fresh copy of the code for an NIH label (KeyError for unknown labels)."""
    return deepcopy(FINDING_CODES[label])


# Short stems for the local value codes (Code Value is SH: 16 characters at most).
_STEMS: Final[dict[str, str]] = {
    "Atelectasis": "ATEL",
    "Cardiomegaly": "CARDIOMEG",
    "Effusion": "EFFUSION",
    "Infiltration": "INFILTR",
    "Mass": "MASS",
    "Nodule": "NODULE",
    "Pneumonia": "PNEUMONIA",
    "Pneumothorax": "PNEUMOTHORAX",
    "Consolidation": "CONSOLID",
    "Edema": "EDEMA",
    "Emphysema": "EMPHYSEMA",
    "Fibrosis": "FIBROSIS",
    "Pleural_Thickening": "PLEURAL_THICK",
    "Hernia": "HERNIA",
}


def value_concept(label: str, calibrated: bool) -> CodedConcept:
    """Local concept naming a finding's value, e.g. (PNEUMOTHORAX-S, 99CXR, "Pneumothorax score").

    Viewers label a measurement with its concept name (OHIF: the NUM's Code Meaning), and DCM 122157
    "Probability" would read the same for every finding. TID 1501 measurement names are extensible.
    """
    suffix = "P" if calibrated else "S"
    return CodedConcept(
        value=f"{_STEMS[label]}-{suffix}",
        scheme_designator=LOCAL_SCHEME_DESIGNATOR,
        meaning=value_name(label, calibrated),
    )


def value_name(label: str, calibrated: bool) -> str:
    """What a finding's number is called where a reader sees it: "Pneumothorax probability" only for a
    calibrated bundle, else "Pneumothorax score" (an uncalibrated output is not a probability)."""
    return f"{display_name(label)} {'probability' if calibrated else 'score'}"


def display_name(label: str) -> str:
    """Human-readable name of an NIH label; unknown labels fall back to the label with spaces."""
    return DISPLAY_NAMES.get(label, label.replace("_", " "))
