"""Finding codes: the 14 NIH labels, their SNOMED/DCM concepts and the documented local code."""

from __future__ import annotations

import pytest

from worker.dicom.codes import (
    ABSENT,
    DISPLAY_NAMES,
    FINDING,
    FINDING_CODES,
    LOCAL_CODING_SCHEME,
    NIH_LABELS,
    NO_UNITS,
    PRESENT,
    PROBABILITY,
    display_name,
    finding_code,
)

EXPECTED = {
    "Atelectasis": ("SCT", "46621007"),
    "Cardiomegaly": ("SCT", "287272002"),
    "Effusion": ("SCT", "60046008"),
    "Infiltration": ("DCM", "112121"),
    "Mass": ("SCT", "4147007"),
    "Nodule": ("SCT", "27925004"),
    "Pneumonia": ("SCT", "233604007"),
    "Pneumothorax": ("SCT", "36118008"),
    "Consolidation": ("SCT", "95436008"),
    "Edema": ("SCT", "19242006"),
    "Emphysema": ("SCT", "87433001"),
    "Fibrosis": ("SCT", "112674009"),
    "Pleural_Thickening": ("99CXR", "PLEURAL_THICK"),
    "Hernia": ("SCT", "84089009"),
}


def test_labels_are_nih_order() -> None:
    assert tuple(EXPECTED) == NIH_LABELS
    assert tuple(FINDING_CODES) == NIH_LABELS
    assert tuple(DISPLAY_NAMES) == NIH_LABELS


@pytest.mark.parametrize("label", NIH_LABELS)
def test_finding_code(label: str) -> None:
    code = FINDING_CODES[label]
    assert (code.scheme_designator, code.value) == EXPECTED[label]
    assert 0 < len(code.meaning) <= 64
    assert len(code.value) <= 16  # SH


def test_meanings_that_matter() -> None:
    assert FINDING_CODES["Effusion"].meaning == "Pleural effusion"
    assert FINDING_CODES["Infiltration"].meaning == "Infiltrate"
    assert FINDING_CODES["Edema"].meaning == "Pulmonary edema"
    assert FINDING_CODES["Emphysema"].meaning == "Pulmonary emphysema"
    assert FINDING_CODES["Hernia"].meaning == "Hiatal hernia"


def test_local_scheme_is_private_and_declared() -> None:
    assert FINDING_CODES["Pleural_Thickening"].scheme_designator.startswith("99")
    assert LOCAL_CODING_SCHEME.CodingSchemeDesignator == "99CXR"


def test_vocabulary() -> None:
    assert (FINDING.scheme_designator, FINDING.value) == ("DCM", "121071")
    assert (PROBABILITY.scheme_designator, PROBABILITY.value) == ("DCM", "122157")
    assert (PRESENT.scheme_designator, PRESENT.value) == ("SCT", "52101004")
    assert (ABSENT.scheme_designator, ABSENT.value) == ("SCT", "272519000")
    assert (NO_UNITS.scheme_designator, NO_UNITS.value) == ("UCUM", "1")


def test_display_names_and_copies() -> None:
    assert display_name("Pleural_Thickening") == "Pleural thickening"
    assert display_name("Effusion") == "Pleural effusion"
    assert display_name("Something_New") == "Something New"
    copy = finding_code("Mass")
    assert copy == FINDING_CODES["Mass"] and copy is not FINDING_CODES["Mass"]
    with pytest.raises(KeyError):
        finding_code("No Finding")
