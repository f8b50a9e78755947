"""Outputs are valid whatever the source says: every attribute copied into the SR, SC and GSPS.

A property-based test (hypothesis, derandomised so CI runs the same cases) writes invalid values for
every attribute in ``worker.dicom.source.COPIED`` into a real chest image's file, reads it back as the
worker does, and builds all four outputs plus the "not analysed" report. Each output's attributes must
pass the VR checks; the first examples (and the explicit ones) also go through dciodvfy, which is slow,
so only those. CXR_HOSTILE_EXAMPLES raises the number of examples (e.g. 500 for a longer run).
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.valuerep import validate_value

from service.core.status import ReasonCode
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.hostile import chest_cr, nih_pixels
from worker.dicom.gsps import build_findings_gsps
from worker.dicom.sc import build_heatmap_sc
from worker.dicom.source import ANALYSED, COPIED, IDENTITY, SourceHeaderError, clean_element, source_header
from worker.dicom.sr import (
    AlgorithmInfo,
    FindingResult,
    OutputContext,
    build_findings_sr,
    build_not_analysed_sr,
    build_results_sr,
)
from worker.regions import finding_region

EXAMPLES = int(os.environ.get("CXR_HOSTILE_EXAMPLES", "30"))
DCIODVFY_EXAMPLES = 3  # dciodvfy on all five outputs of the first few examples only (~0.1 s a call)
ALGORITHM = AlgorithmInfo(
    name="cxr-densenet121", version="1.0.0", bundle_hash="sha256:00", software_version="cxr-gateway 0.1"
)
FINDINGS = [FindingResult("Effusion", 0.9, 0.4), FindingResult("Mass", 0.1, 0.5)]
PREFIX = "1.2.826.0.1.3680043.10.1453.77."
CONTEXT = OutputContext(
    algorithm=ALGORITHM, series_instance_uid=PREFIX + "1", sop_instance_uid=PREFIX + "2", series_number=9901
)
# Identity UIDs get their own test: an invalid one refuses the outputs instead of being fixed.
MUTABLE = [keyword for keyword in COPIED if keyword not in IDENTITY]
SIDE = 256
# Without these there is no image to analyse (the analysed outputs refuse; the report still goes out).
GEOMETRY = ANALYSED


def _base() -> pydicom.Dataset:
    """A real chest X-ray with a valid value in every copied attribute."""
    ds = chest_cr(nih_pixels(3, side=SIDE))
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = "Müller^Jürgen"
    ds.IssuerOfPatientID = "HOSPITAL"
    ds.StudyDescription = "XR CHEST PA"
    ds.PatientAge = "045Y"
    ds.PatientSize = "1.80"
    ds.PatientWeight = "80"
    ds.Laterality = ""
    ds.ImageLaterality = "U"
    ds.AnatomicalOrientationType = "BIPED"
    ds.PixelSpacing = ["0.5", "0.5"]
    ds.ImagerPixelSpacing = ["0.5", "0.5"]
    ds.LossyImageCompression = "00"
    ds.RescaleSlope = "1"
    ds.RescaleIntercept = "0"
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.WindowCenterWidthExplanation = "FULL"
    ds.VOILUTFunction = "LINEAR"
    return ds


_NASTY = st.sampled_from(
    [
        "chest ",
        "Chest",
        "pa",
        "nan",
        "inf",
        "-1e999",
        "1e-400",
        "12.5",
        "2024.13.45",
        "2024.01.02",
        "20240230",
        "25:61:61",
        "12:30:00",
        "62",
        "0.1234567890123456789",
        "a\\b\\c",
        "x\x01y",
        "\x00",
        "é",
        "漢字",
        "A" * 80,
        "^^^^^^^",
        "a=b=c=d",
        " ",
        "1.02.3",
        "-0",
    ]
)
_VALUES = st.one_of(
    _NASTY, st.text(max_size=80), st.text(alphabet=st.characters(max_codepoint=0x7F), max_size=20)
)


def _bad_lut() -> pydicom.Sequence:
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 16]
    item.add_new("LUTData", "US", [1, 2, 3])  # 3 entries where 256 are declared
    return pydicom.Sequence([item])


def _write_raw(ds: pydicom.Dataset, mutations: dict[str, Any]) -> pydicom.Dataset:
    """``ds`` with ``mutations`` written byte for byte (UTF-8, whatever the character set says), saved
    and read back as a received file is."""
    for keyword, value in mutations.items():
        tag = Tag(keyword)
        vr = dictionary_VR(keyword)
        if vr == "SQ":
            setattr(ds, keyword, _bad_lut())
            continue
        if vr in ("US", "SS"):
            raw = struct.pack("<3H", 1, 2, 3)  # a wrong value multiplicity is all that can be wrong
        else:
            raw = str(value).encode("utf-8")
            raw += b"\x00" if vr == "UI" and len(raw) % 2 else b" " * (len(raw) % 2)
        ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buffer.getvalue()))


def _outputs(source: pydicom.Dataset, only: Any = None) -> Iterator[tuple[str, pydicom.Dataset]]:
    """The five outputs for ``source`` (or the one that ``only`` builds)."""
    display = np.linspace(0, 1, SIDE * SIDE, dtype=np.float32).reshape(SIDE, SIDE)
    heat = np.zeros((16, 16), np.float32)
    heat[10:13, 10:13] = 1.0
    regions = [r for r in [finding_region("Effusion", heat, SIDE, SIDE)] if r is not None]
    ids = CONTEXT
    builds: list[tuple[str, Any, Any]] = [
        (
            "sr",
            build_findings_sr,
            lambda: build_findings_sr(source, FINDINGS, ids, regions=regions),
        ),
        ("report", build_results_sr, lambda: build_results_sr(source, FINDINGS, ids)),
        (
            "sc",
            build_heatmap_sc,
            lambda: build_heatmap_sc(source, display, {"Effusion": heat}, FINDINGS, regions, ids),
        ),
        (
            "gsps",
            build_findings_gsps,
            lambda: build_findings_gsps(source, regions, FINDINGS, ids),
        ),
        (
            "not-analysed",
            build_not_analysed_sr,
            lambda: build_not_analysed_sr([source], {str(source.SOPInstanceUID): "image_blank"}, ids),
        ),
    ]
    for name, builder, build in builds:
        if only is None or builder is only:
            yield name, build()


def _invalid_copied(output: pydicom.Dataset) -> list[str]:
    """Keywords of copied attributes in ``output`` whose value is not valid for its VR."""
    bad = []
    for keyword in COPIED:
        if keyword not in output or dictionary_VR(keyword) == "SQ":
            continue
        element = output[keyword]
        if element.value in (None, "") or element.VM == 0:
            continue  # empty (Type 2) is valid for any VR
        values = element.value if element.VM > 1 else [element.value]
        try:
            for value in values:
                if value not in (None, ""):
                    # pydicom's validator takes DS and IS as the strings they are written as.
                    text = str(value) if element.VR in ("DS", "IS") else value
                    validate_value(element.VR, text, config.RAISE)
        except ValueError:
            bad.append(keyword)
            continue
        cleaned = clean_element(element, output.get("SpecificCharacterSet"))
        if cleaned is None or _strings(cleaned.value) != _strings(element.value):
            bad.append(keyword)
    return bad


def _strings(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | MultiValue) else [str(value)]


_checked = {"dciodvfy": 0}


def _check(source: pydicom.Dataset, tmp: Path, *, dciodvfy: bool) -> None:
    header = source_header(source)
    assert _invalid_copied(header) == []
    if not all(keyword in header for keyword in GEOMETRY):
        # No image to analyse (the decoder refuses it too): the analysed outputs refuse, the "not
        # analysed" report still goes out, valid.
        for build in (build_findings_sr, build_heatmap_sc, build_findings_gsps):
            with pytest.raises(ValueError):
                dict(_outputs(source, only=build))
        outputs = list(_outputs(source, only=build_not_analysed_sr))
    else:
        outputs = list(_outputs(source))
    for name, output in outputs:
        assert _invalid_copied(output) == [], name
        if dciodvfy:
            path = tmp / f"{name}.dcm"
            output.save_as(path, enforce_file_format=True)
            assert dciodvfy_errors(path) == [], name


@pytest.fixture(scope="module")
def tmp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("copied")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    mutations=st.dictionaries(
        # Rows, Columns, Modality rarely: without them only the "not analysed" report is built.
        st.sampled_from([k for k in MUTABLE if k not in GEOMETRY] * 10 + list(GEOMETRY)),
        _VALUES,
        min_size=1,
        max_size=len(MUTABLE),
    )
)
@example(mutations={"BodyPartExamined": "chest "})  # the case: the SC failed dciodvfy 7 times
@example(mutations=dict.fromkeys(MUTABLE, "x\x01y"))
@example(mutations=dict.fromkeys(MUTABLE, "nan"))
def test_every_copied_attribute_is_valid_in_every_output(
    shared_dir: Path, tmp_dir: Path, mutations: dict[str, str]
) -> None:
    source = _write_raw(_base(), mutations)
    explicit = mutations in ({"BodyPartExamined": "chest "},)
    run_dciodvfy = explicit or _checked["dciodvfy"] < DCIODVFY_EXAMPLES
    if run_dciodvfy and not explicit:
        _checked["dciodvfy"] += 1
    _check(source, tmp_dir, dciodvfy=run_dciodvfy)


def test_a_lower_case_code_string_is_normalised_and_logged(
    shared_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before: BodyPartExamined "chest " was copied as it was; the SC failed dciodvfy with 7 errors."""
    source = _write_raw(_base(), {"BodyPartExamined": "chest ", "PatientAge": "62"})
    with caplog.at_level("INFO", logger="worker.dicom.source"):
        header = source_header(source)
    assert header.BodyPartExamined == "CHEST"
    assert "PatientAge" not in header
    lines = [r.getMessage() for r in caplog.records]
    assert f"source attribute {ReasonCode.SOURCE_ATTRIBUTE_NORMALISED} keyword=BodyPartExamined" in lines
    assert f"source attribute {ReasonCode.SOURCE_ATTRIBUTE_DROPPED} keyword=PatientAge" in lines
    assert not any("62" in line or "chest" in line for line in lines), "values are never logged"
    sc = dict(_outputs(source))["sc"]
    assert sc.BodyPartExamined == "CHEST"


@pytest.mark.parametrize("keyword", IDENTITY)
@pytest.mark.parametrize("value", ["1.02.3", "1.2.x", "", "1." + "2" * 70])
def test_an_invalid_identity_refuses_the_outputs(shared_dir: Path, keyword: str, value: str) -> None:
    source = _write_raw(_base(), {keyword: value})
    with pytest.raises(SourceHeaderError) as caught:
        source_header(source)
    assert caught.value.reason in {ReasonCode.INVALID_UIDS, ReasonCode.MISSING_UIDS}
    for build in (build_results_sr, build_findings_sr):
        with pytest.raises(ValueError):
            build(source, FINDINGS, CONTEXT)
