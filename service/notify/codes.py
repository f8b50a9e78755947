"""Codes the HL7 v2 and FHIR messages carry (the service may not import worker.dicom.codes, so the finding
codes are listed again here; tests/unit/notify/test_codes.py checks both lists agree)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

DISCLAIMER: Final = "AI-generated, not for diagnostic use"


@dataclass(frozen=True)
class Code:
    system: str  # HL7 v2 coding system (table 0396): SCT, DCM, LN, 99CXR (local)
    code: str
    display: str

    @property
    def fhir_system(self) -> str:
        return FHIR_SYSTEMS[self.system]


FHIR_SYSTEMS: Final = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "99CXR": "urn:cxr-gateway:codes",
}

LOCAL = "99CXR"

FINDINGS: Final[dict[str, Code]] = {
    "Atelectasis": Code("SCT", "46621007", "Atelectasis"),
    "Cardiomegaly": Code("SCT", "287272002", "Cardiomegaly"),
    "Effusion": Code("SCT", "60046008", "Pleural effusion"),
    "Infiltration": Code("DCM", "112121", "Infiltrate"),
    "Mass": Code("SCT", "4147007", "Mass"),
    "Nodule": Code("SCT", "27925004", "Nodule"),
    "Pneumonia": Code("SCT", "233604007", "Pneumonia"),
    "Pneumothorax": Code("SCT", "36118008", "Pneumothorax"),
    "Consolidation": Code("SCT", "95436008", "Lung consolidation"),
    "Edema": Code("SCT", "19242006", "Pulmonary edema"),
    "Emphysema": Code("SCT", "87433001", "Pulmonary emphysema"),
    "Fibrosis": Code("SCT", "112674009", "Fibrosis"),
    "Pleural_Thickening": Code(LOCAL, "PLEURAL_THICK", "Pleural thickening"),
    "Hernia": Code("SCT", "84089009", "Hiatal hernia"),
}

PRESENT: Final = Code("SCT", "52101004", "Present")
PROBABILITY: Final = Code("DCM", "122157", "Probability")
SCORE: Final = Code(LOCAL, "SCORE", "Model score (uncalibrated)")
ALGORITHM: Final = Code(LOCAL, "ALGORITHM", "Algorithm name and version")
STUDY_UID: Final = Code("DCM", "110180", "Study Instance UID")
# The report: LOINC 18748-4 "Diagnostic imaging study" (the kind of report); the exam is a chest X-ray.
REPORT: Final = Code("LN", "18748-4", "Diagnostic imaging study")
CHEST_XRAY: Final = Code("LN", "36643-5", "XR Chest 2 Views")


def finding(label: str) -> Code:
    """The code of a bundle label; a label without one gets a local code (documented in integration.md)."""
    return FINDINGS.get(label) or Code(LOCAL, label.upper()[:20], label.replace("_", " "))
