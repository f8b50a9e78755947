"""Findings and not-analysed SRs: read back with highdicom, validated by dciodvfy, parsed by DCMTK."""

from __future__ import annotations

import subprocess
from copy import deepcopy
from pathlib import Path

import highdicom as hd
import pydicom
import pytest

from tests.support.dciodvfy import dciodvfy_errors
from tests.support.paths import CHEST_DICOM, SR_DICOM
from worker.dicom.codes import AI_DISCLAIMER, FINDING_CODES, NIH_LABELS
from worker.dicom.sr import (
    AlgorithmInfo,
    FindingResult,
    build_findings_sr,
    build_not_analysed_sr,
    series_description,
)
from worker.dicom.uids import derive_uid

PREFIX = "1.2.826.0.1.3680043.10.1453."
ALGORITHM = AlgorithmInfo(
    name="cxr-densenet121",
    version="1.2.0",
    bundle_hash="sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    software_version="cxr-gateway 0.1.0",
    device_uid="1.2.826.0.1.3680043.10.1453.99.1",
)


def _findings() -> list[FindingResult]:
    # Spread of probabilities; Effusion and Pleural_Thickening above their thresholds.
    probabilities = [0.02 + 0.05 * i for i in range(len(NIH_LABELS))]
    findings = [FindingResult(label, p, 0.7) for label, p in zip(NIH_LABELS, probabilities, strict=True)]
    findings[2] = FindingResult("Effusion", 0.912345678, 0.35)
    return findings


def _save(ds: pydicom.Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def _dsrdump(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["dsrdump", str(path)], capture_output=True, text=True, timeout=60, check=False)


def _referenced_sops(ds: pydicom.Dataset) -> list[pydicom.Dataset]:
    (study,) = ds.CurrentRequestedProcedureEvidenceSequence
    return [sop for series in study.ReferencedSeriesSequence for sop in series.ReferencedSOPSequence]


def _build(source: pydicom.Dataset, findings: list[FindingResult] | None = None) -> pydicom.Dataset:
    return build_findings_sr(
        [source],
        findings or _findings(),
        ALGORITHM,
        series_instance_uid=derive_uid(PREFIX, source.StudyInstanceUID, ALGORITHM.version, "sr-series"),
        sop_instance_uid=derive_uid(PREFIX, source.SOPInstanceUID, ALGORITHM.version, "sr"),
    )


@pytest.fixture(scope="module")
def cr_source() -> pydicom.Dataset:
    if not CHEST_DICOM.is_dir():
        pytest.skip(f"{CHEST_DICOM} is absent")
    return pydicom.dcmread(CHEST_DICOM / "cr-pa-mono1-explicit-le.dcm")


def test_finding_result_present_at_threshold() -> None:
    assert FindingResult("Mass", 0.5, 0.5).present
    assert not FindingResult("Mass", 0.4999, 0.5).present


def test_findings_sr_reads_back(shared_dir: Path, cr_source: pydicom.Dataset, tmp_path: Path) -> None:
    findings = _findings()
    path = _save(_build(cr_source, findings), tmp_path / "sr.dcm")

    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == 14
    by_label = {group.tracking_identifier: group for group in groups}
    assert list(by_label) == list(NIH_LABELS)
    for finding in findings:
        group = by_label[finding.label]
        assert group.finding_type == FINDING_CODES[finding.label]
        (measurement,) = group.get_measurements()
        assert measurement.name.value == "122157"
        assert measurement.unit.value == "1"
        assert float(measurement.value) == pytest.approx(finding.probability, abs=1e-6)
        (evaluation,) = group.get_qualitative_evaluations()
        assert evaluation.name == FINDING_CODES[finding.label]
        assert evaluation.value.value == ("52101004" if finding.present else "272519000")
        assert [image.referenced_sop_instance_uid for image in group.source_images] == [
            cr_source.SOPInstanceUID
        ]


def test_findings_sr_header(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
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

    texts = [
        item.TextValue
        for container in ds.ContentSequence
        if container.ValueType == "CONTAINER"
        for item in container.get("ContentSequence", [])
        if item.ValueType == "TEXT"
    ]
    assert any(AI_DISCLAIMER in text and ALGORITHM.bundle_hash in text for text in texts)
    assert any("threshold" in text.lower() for text in texts)
    procedure = [item for item in ds.ContentSequence if item.ConceptNameCodeSequence[0].CodeValue == "121058"]
    assert procedure[0].ConceptCodeSequence[0].CodeValue == "399208008"


def test_findings_sr_records_each_threshold(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    sr = hd.sr.Comprehensive3DSR.from_dataset(_build(cr_source))
    groups = sr.content.get_image_measurement_groups()
    effusion = next(g for g in groups if g.tracking_identifier == "Effusion")
    parameters = [
        item.TextValue
        for item in effusion[0].ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == "111002"  # Algorithm Parameters
    ]
    assert "threshold=0.35" in parameters
    assert f"bundle_hash={ALGORITHM.bundle_hash}" in parameters


@pytest.mark.parametrize("name", ["cr-pa-mono1-explicit-le.dcm", "sc-pa-jpeg-baseline.dcm"])
def test_findings_sr_validates(shared_dir: Path, name: str, tmp_path: Path) -> None:
    path = _save(_build(pydicom.dcmread(CHEST_DICOM / name)), tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Imaging Measurement Report" in dump.stdout
    assert dump.stdout.count('"Measurement Group"') == 14
    assert "E:" not in dump.stderr


def test_findings_sr_is_deterministic_in_uids(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    first, second = _build(cr_source), _build(cr_source)
    assert first.SOPInstanceUID == second.SOPInstanceUID
    assert first.SeriesInstanceUID == second.SeriesInstanceUID
    tracking = [
        hd.sr.Comprehensive3DSR.from_dataset(ds)
        .content.get_image_measurement_groups()[0][0]
        .ContentSequence[1]
        .UID
        for ds in (first, second)
    ]
    assert tracking[0] == tracking[1]


def test_findings_sr_with_two_sources(shared_dir: Path, cr_source: pydicom.Dataset, tmp_path: Path) -> None:
    other = deepcopy(cr_source)
    other.SOPInstanceUID = derive_uid(PREFIX, cr_source.SOPInstanceUID, "copy")
    ds = build_findings_sr(
        [cr_source, other],
        _findings()[:3],
        ALGORITHM,
        series_instance_uid=derive_uid(PREFIX, "series"),
        sop_instance_uid=derive_uid(PREFIX, "sop"),
    )
    referenced = _referenced_sops(ds)
    assert {item.ReferencedSOPInstanceUID for item in referenced} == {
        cr_source.SOPInstanceUID,
        other.SOPInstanceUID,
    }
    assert "CodingSchemeIdentificationSequence" not in ds  # no local code among these three
    assert dciodvfy_errors(_save(ds, tmp_path / "sr.dcm")) == []


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
def test_findings_sr_rejects_bad_findings(
    shared_dir: Path, cr_source: pydicom.Dataset, findings: list[FindingResult]
) -> None:
    with pytest.raises(ValueError):
        build_findings_sr(
            [cr_source], findings, ALGORITHM, series_instance_uid="1.2.3", sop_instance_uid="1.2.4"
        )


def test_findings_sr_rejects_sources_from_two_studies(shared_dir: Path, cr_source: pydicom.Dataset) -> None:
    other = deepcopy(cr_source)
    other.StudyInstanceUID = "1.2.3.4"
    with pytest.raises(ValueError, match="one study"):
        build_findings_sr(
            [cr_source, other], _findings(), ALGORITHM, series_instance_uid="1.2.3", sop_instance_uid="1.2.4"
        )
    with pytest.raises(ValueError):
        build_findings_sr([], _findings(), ALGORITHM, series_instance_uid="1.2.3", sop_instance_uid="1.2.4")


def test_not_analysed_sr_for_an_image(shared_dir: Path, cr_source: pydicom.Dataset, tmp_path: Path) -> None:
    ds = build_not_analysed_sr(
        [cr_source],
        {cr_source.SOPInstanceUID: "not_frontal"},
        ALGORITHM,
        series_instance_uid=derive_uid(PREFIX, cr_source.StudyInstanceUID, "1.2.0", "sr-series"),
        sop_instance_uid=derive_uid(PREFIX, cr_source.StudyInstanceUID, "1.2.0", "not-analysed-sr"),
    )
    path = _save(ds, tmp_path / "not-analysed.dcm")
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "No algorithms succeeded; without findings" in dump.stdout
    assert "Image Library" in dump.stdout

    sr = hd.sr.srread(path)
    assert isinstance(sr.content, hd.sr.MeasurementReport)
    assert sr.content.get_image_measurement_groups() == []
    texts = [item.TextValue for item in ds.ContentSequence[-1].ContentSequence if item.ValueType == "TEXT"]
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
        ALGORITHM,
        series_instance_uid=derive_uid(PREFIX, received.StudyInstanceUID, "sr-series"),
        sop_instance_uid=derive_uid(PREFIX, received.StudyInstanceUID, "not-analysed-sr"),
    )
    referenced = _referenced_sops(ds)
    assert referenced[0].ReferencedSOPInstanceUID == received.SOPInstanceUID
    path = _save(ds, tmp_path / "not-analysed.dcm")
    assert dciodvfy_errors(path) == []
    dump = _dsrdump(path)
    assert dump.returncode == 0, dump.stderr
    assert "Image Library" not in dump.stdout
    assert "not_image_object" in dump.stdout or "Not analysed" in dump.stdout


def test_series_description_always_keeps_the_disclaimer() -> None:
    text = series_description("x" * 100)
    assert len(text) == 64
    assert text.endswith(AI_DISCLAIMER)
