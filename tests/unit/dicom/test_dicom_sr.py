"""Measurement, results and not-analysed SRs: read back with highdicom, validated by dciodvfy, parsed by
DCMTK, and checked against what viewers need (a region in every measurement group, text-report titles)."""

from __future__ import annotations

import dataclasses
import subprocess
from copy import deepcopy
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest

from service.core.status import OutputKind
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.outputs import ALGORITHM, context, save
from tests.support.paths import CHEST_DICOM, SR_DICOM
from tests.support.peers import tool
from worker.dicom.codes import AI_DISCLAIMER, FINDING_CODES, NIH_LABELS, display_name
from worker.dicom.priority import read_priority
from worker.dicom.sr import (
    AlgorithmInfo,
    FindingResult,
    build_findings_sr,
    build_not_analysed_sr,
    build_results_sr,
    series_description,
)
from worker.regions import Region, finding_region


def _findings() -> list[FindingResult]:
    # A spread of scores at 0.7; Effusion (0.91 ≥ 0.35) and the last three (≥ 0.7) are present.
    scores = [0.02 + 0.05 * i for i in range(len(NIH_LABELS))]
    findings = [FindingResult(label, p, 0.7) for label, p in zip(NIH_LABELS, scores, strict=True)]
    findings[2] = FindingResult("Effusion", 0.912345678, 0.35)
    return findings


def _regions(source: pydicom.Dataset, findings: list[FindingResult]) -> list[Region]:
    heat = np.zeros((8, 8), np.float32)
    heat[2:4, 5] = 1.0
    regions = [finding_region(f.label, heat, int(source.Rows), int(source.Columns)) for f in findings]
    return [r for r, f in zip(regions, findings, strict=True) if r is not None and f.present]


def _dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("dsrdump", "dcmtk"), "+Pl", str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def _referenced_sops(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    return [sop for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence]


def _build(
    source: pydicom.Dataset,
    findings: list[FindingResult] | None = None,
    *,
    regions: list[Region] | None = None,
    algorithm: AlgorithmInfo = ALGORITHM,
    priority: str | None = None,
) -> pydicom.Dataset:
    findings = findings or _findings()
    return build_findings_sr(
        source,
        findings,
        context(source, OutputKind.SR, algorithm),
        regions=_regions(source, findings) if regions is None else regions,
        priority=priority,
    )


def _results(source: pydicom.Dataset, algorithm: AlgorithmInfo = ALGORITHM) -> pydicom.Dataset:
    return build_results_sr(source, _findings(), context(source, OutputKind.REPORT, algorithm))


def _content_items(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    """Every content item of the tree, depth first."""
    found: list[pydicom.Dataset] = []
    stack = list(ds.get("ContentSequence", []))[::-1]
    while stack:
        item = stack.pop()
        found.append(item)
        stack.extend(list(item.get("ContentSequence", []))[::-1])
    return found


@pytest.fixture(scope="module")
def cr_source(shared_dir: Path) -> pydicom.Dataset:
    # shared_dir: ../shared present, or skipped locally and failed under CI by the suite's one rule
    return pydicom.dcmread(shared_dir / "dicom/chest/cr-pa-mono1-explicit-le.dcm")


def test_finding_result_present_at_threshold() -> None:
    assert FindingResult("Mass", 0.5, 0.5).present
    assert not FindingResult("Mass", 0.4999, 0.5).present


def test_measurement_report_has_a_region_in_every_group(
    shared_dir: Path, cr_source: pydicom.Dataset, tmp_path: Path
) -> None:
    findings = _findings()
    present = [f for f in findings if f.present]
    path = save(_build(cr_source, findings), tmp_path / "sr.dcm")

    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert sr.ConceptNameCodeSequence[0].CodeValue == "126000"
    groups = sr.content.get_planar_roi_measurement_groups()
    assert sr.content.get_image_measurement_groups() == []  # none without a region: they crash OHIF
    assert [g.tracking_identifier for g in groups] == [f"{display_name(f.label)} (AI)" for f in present]
    for finding, group in zip(present, groups, strict=True):
        assert group.tracking_uid
        assert group.finding_type == FINDING_CODES[finding.label]
        region = group.roi
        assert region is not None and region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        points = region.value
        assert (points[0] == points[-1]).all() and len(points) >= 4, "a closed outline"
        assert (points[:, 0] >= 0).all() and (points[:, 0] <= cr_source.Columns).all()
        assert (points[:, 1] >= 0).all() and (points[:, 1] <= cr_source.Rows).all()
        (image,) = region.ContentSequence  # SELECTED FROM the source image
        assert image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cr_source.SOPInstanceUID
        (measurement,) = group.get_measurements()
        # The label a viewer shows is the NUM's meaning: it must name the finding, and say "score"
        # for an uncalibrated bundle.
        assert measurement.name.meaning == f"{display_name(finding.label)} score"
        assert measurement.unit.value == "{score}"
        assert float(measurement.value) == pytest.approx(finding.score, abs=1e-6)
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name == FINDING_CODES[finding.label]
        assert evaluation.value.value == "52101004"


def test_calibrated_values_are_probabilities_in_percent(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    calibrated = dataclasses.replace(ALGORITHM, calibrated=True)
    sr = hd.sr.Comprehensive3DSR.from_dataset(_build(cr_source, algorithm=calibrated))
    group = sr.content.get_planar_roi_measurement_groups()[0]
    (measurement,) = group.get_measurements()
    assert measurement.name.meaning == "Pleural effusion probability"
    assert measurement.unit.value == "%"
    assert float(measurement.value) == pytest.approx(91.2345678, abs=1e-3)
    meanings = [
        i.ConceptNameCodeSequence[0].CodeMeaning for i in _content_items(_results(cr_source, calibrated))
    ]
    assert "Pleural effusion probability" in meanings and "Pleural effusion score" not in meanings


def test_measurement_report_header(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    ds = _build(cr_source)
    assert ds.SOPClassUID == pydicom.uid.Comprehensive3DSRStorage
    assert ds.Modality == "SR"
    assert ds.VerificationFlag == "UNVERIFIED"
    assert ds.Manufacturer == "cxr-gateway"
    assert AI_DISCLAIMER in ds.SeriesDescription and len(ds.SeriesDescription) <= 64
    copied = ("StudyInstanceUID", "PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyDate")
    for keyword in copied:
        assert ds[keyword].value == cr_source[keyword].value
    assert ds.SeriesInstanceUID != cr_source.SeriesInstanceUID

    (series,) = ds.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence
    assert series.SeriesInstanceUID == cr_source.SeriesInstanceUID
    assert series.ReferencedSOPSequence[0].ReferencedSOPInstanceUID == cr_source.SOPInstanceUID

    ours = [item for item in ds.ContributingEquipmentSequence if item.Manufacturer == "cxr-gateway"]
    assert len(ours) == 1
    assert ours[0].ManufacturerModelName == ALGORITHM.model_name
    assert ours[0].SoftwareVersions == ALGORITHM.software_version
    assert ours[0].DeviceUID == ALGORITHM.device_uid
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"

    (scheme,) = ds.CodingSchemeIdentificationSequence
    assert scheme.CodingSchemeDesignator == "99CXR"

    texts = [item.TextValue for item in _content_items(ds) if item.ValueType == "TEXT"]
    assert any(AI_DISCLAIMER in text and ALGORITHM.bundle_hash in text for text in texts)
    assert any("Pleural effusion (score 0.91, operating point 0.35)" in text for text in texts)
    procedure = [item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "399208008"


def test_measurement_report_records_each_threshold(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(_build(cr_source))
    groups = sr.content.get_planar_roi_measurement_groups()
    effusion = next(g for g in groups if g.tracking_identifier == "Pleural effusion (AI)")
    parameters = [
        item.TextValue
        for item in effusion[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111002"  # Algorithm Parameters
    ]
    assert "threshold=0.35" in parameters
    assert f"bundle_hash={ALGORITHM.bundle_hash}" in parameters


@pytest.mark.parametrize("name", ["cr-pa-mono1-explicit-le.dcm", "sc-pa-jpeg-baseline.dcm"])
def test_reports_validate(shared_dir: Path, name: str, tmp_path: Path) -> None:
    source = pydicom.dcmread(CHEST_DICOM / name)
    present = sum(f.present for f in _findings())
    path = save(_build(source), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    assert dump.stdout.count('"Measurement Group"') == present
    assert dump.stdout.count("SCOORD") == present
    assert "E:" not in dump.stderr

    path = save(_results(source), tmp_path / "report.dcm")
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "E:" not in dump.stderr


def test_priority_hint_is_a_qualitative_evaluation(
    shared_dir: Path, cr_source: pydicom.Dataset, tmp_path: Path
) -> None:
    assert read_priority(_build(cr_source)) is None
    path = save(_build(cr_source, priority="stat"), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    ds = pydicom.dcmread(path)
    assert read_priority(ds) == "stat"
    (evaluations,) = [
        item
        for item in ds.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "C0034375"  # TID 1500 Qualitative Evaluations
    ]
    item = evaluations.ContentSequence[-1]
    assert (item.ValueType, item.RelationshipType) == ("CODE", "CONTAINS")
    name, value = item.ConceptNameCodeSequence[0], item.ConceptCodeSequence[0]
    assert (name.CodeValue, name.CodingSchemeDesignator) == ("260870009", "SCT")
    assert (value.CodeValue, value.CodeMeaning) == ("25876001", "Emergent Procedure")


def test_no_present_finding_gives_a_report_without_groups(
    shared_dir: Path, cr_source: pydicom.Dataset, tmp_path: Path
) -> None:
    findings = [FindingResult(label, 0.1, 0.5) for label in NIH_LABELS]
    path = save(_build(cr_source, findings), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path).stdout
    assert "Measurement Group" not in dump and "Imaging Measurements" not in dump
    assert "All algorithms succeeded; without findings" in dump
    assert "No finding above its operating point." in dump


def test_present_finding_without_region_gets_no_group(
    shared_dir: Path, cr_source: pydicom.Dataset, tmp_path: Path
) -> None:
    findings = _findings()
    regions = [r for r in _regions(cr_source, findings) if r.label != "Effusion"]
    path = save(_build(cr_source, findings, regions=regions), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    sr = hd.sr.srread(path)
    labels = [g.tracking_identifier for g in sr.content.get_planar_roi_measurement_groups()]
    assert "Pleural effusion (AI)" not in labels and len(labels) == len(regions)
    assert "Present but not localised (no image region): Pleural effusion." in _dsrdump(path).stdout


def test_regions_must_match_the_findings(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    findings = _findings()
    regions = _regions(cr_source, findings)
    with pytest.raises(ValueError, match="one region"):
        _build(cr_source, findings, regions=[*regions, regions[0]])
    stray = dataclasses.replace(regions[0], label="Hernia")
    with pytest.raises(ValueError, match="unknown"):
        _build(cr_source, findings[:3], regions=[stray])


def test_source_without_geometry_is_refused(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    broken = deepcopy(cr_source)
    del broken.Rows
    with pytest.raises(ValueError):
        _build(broken, regions=[])


def test_reports_are_deterministic_in_uids(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    first, second = _build(cr_source), _build(cr_source)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    tracking = [
        hd.sr.Comprehensive3DSR.from_dataset(ds).content.get_planar_roi_measurement_groups()[0].tracking_uid
        for ds in (first, second)
    ]
    assert tracking[0] == tracking[1]


def test_results_report_lists_every_finding_as_text(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    ds = _results(cr_source)
    assert ds.SOPClassUID == pydicom.uid.ComprehensiveSRStorage
    # A CID 7000 title: viewers (OHIF) show it in their text viewport, not the measurement one.
    assert ds.ConceptNameCodeSequence[0].CodeValue == "43468-8"
    assert ds.ConceptNameCodeSequence[0].CodeMeaning == "X-Ray Report"
    assert ds.ContinuityOfContent == "SEPARATE"
    items = _content_items(ds)
    assert all(i.ContinuityOfContent == "SEPARATE" for i in items if i.ValueType == "CONTAINER")
    assert not [i for i in items if i.ValueType in ("IMAGE", "SCOORD")]  # text viewers can't show those
    (findings_section,) = [
        i for i in ds.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "121070"
    ]
    rows = findings_section.ContentSequence
    assert len(rows) == 14
    for finding, row in zip(_findings(), rows, strict=True):
        # One container per finding, its items siblings: text viewers print a container's children.
        assert row.ValueType == "CONTAINER" and row.ConceptNameCodeSequence[0] == FINDING_CODES[finding.label]
        presence, value, threshold = row.ContentSequence
        assert presence.ConceptNameCodeSequence[0] == FINDING_CODES[finding.label]
        assert presence.ConceptCodeSequence[0].CodeMeaning == ("Present" if finding.present else "Absent")
        assert value.ConceptNameCodeSequence[0].CodeMeaning == f"{display_name(finding.label)} score"
        # Three decimals in the text report: what a reader can use.
        assert float(value.MeasuredValueSequence[0].NumericValue) == round(finding.score, 3)
        assert threshold.ConceptNameCodeSequence[0].CodeMeaning == "Operating point"
        assert float(threshold.MeasuredValueSequence[0].NumericValue) == round(finding.threshold, 3)
        assert not any("ContentSequence" in item for item in row.ContentSequence)
    texts = " ".join(i.TextValue for i in items if i.ValueType == "TEXT")
    assert AI_DISCLAIMER in texts and ALGORITHM.name in texts and ALGORITHM.version in texts
    assert "not calibrated" in texts
    assert AI_DISCLAIMER in ds.SeriesDescription


@pytest.mark.parametrize(
    "findings",
    [
        [],
        [FindingResult("No Finding", 0.5, 0.5)],
        [FindingResult("Mass", 0.5, 0.5), FindingResult("Mass", 0.6, 0.5)],
        [FindingResult("Mass", 1.5, 0.5)],
        [FindingResult("Mass", float("nan"), 0.5)],
    ],
)
def test_reports_reject_bad_findings(
    shared_dir: Path, cr_source: pydicom.Dataset, findings: list[FindingResult]
) -> None:
    with pytest.raises(ValueError):
        build_findings_sr(cr_source, findings, context(cr_source, OutputKind.SR))
    with pytest.raises(ValueError):
        build_results_sr(cr_source, findings, context(cr_source, OutputKind.REPORT))


def test_not_analysed_sr_for_an_image(shared_dir: Path, cr_source: pydicom.Dataset, tmp_path: Path) -> None:
    ds = build_not_analysed_sr(
        [cr_source],
        {cr_source.SOPInstanceUID: "not_frontal"},
        context(cr_source, OutputKind.SR),
    )
    path = save(ds, tmp_path / "not-analysed.dcm")
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "X-Ray Report" in dump.stdout and "Measurement Group" not in dump.stdout
    texts = [item.TextValue for item in _content_items(ds) if item.ValueType == "TEXT"]
    assert any("not_frontal" in text and cr_source.SOPInstanceUID in text for text in texts)
    assert any(AI_DISCLAIMER in text for text in texts)
    assert ds.StudyInstanceUID == cr_source.StudyInstanceUID
    assert ds.VerificationFlag == "UNVERIFIED"
    assert AI_DISCLAIMER in ds.SeriesDescription


def test_not_analysed_sr_for_a_non_image(shared_dir: Path, tmp_path: Path) -> None:
    received = pydicom.dcmread(SR_DICOM / "tid1500-example.dcm")
    ds = build_not_analysed_sr(
        [received],
        {received.SOPInstanceUID: "not_image_object"},
        context(received, OutputKind.SR),
    )
    referenced = _referenced_sops(ds)
    assert referenced[0].ReferencedSOPInstanceUID == received.SOPInstanceUID
    path = save(ds, tmp_path / "not-analysed.dcm")
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "not_image_object" in dump.stdout


def test_series_description_always_keeps_the_disclaimer() -> None:
    text = series_description("x" * 100)
    assert len(text) == 64
    assert text.endswith(AI_DISCLAIMER)
