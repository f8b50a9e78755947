from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import Dataset, dcmread

from service.core.status import ReasonCode
from worker.dicom.gate import GateRules, check_header


def _cr(**attrs: object) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.Rows = ds.Columns = 1024
    ds.SamplesPerPixel = 1
    ds.PixelData = b"\0\0"
    for k, v in attrs.items():
        setattr(ds, k, v)
    return ds


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({}, None),
        ({"ViewPosition": ""}, None),
        ({"ViewPosition": "LL"}, ReasonCode.NOT_FRONTAL),
        ({"BodyPartExamined": "KNEE"}, ReasonCode.NOT_CHEST),
        ({"Modality": "CT"}, ReasonCode.UNSUPPORTED_MODALITY),
        ({"PatientSpeciesDescription": "Canis lupus familiaris"}, ReasonCode.NOT_CHEST),
        ({"SamplesPerPixel": 3}, ReasonCode.NOT_2D_GREY),
        ({"Rows": 100}, ReasonCode.TOO_SMALL),
        ({"SOPClassUID": "1.2.840.10008.5.1.4.1.1.88.34"}, ReasonCode.NOT_IMAGE_OBJECT),
    ],
)
def test_default_rules(attrs: dict[str, object], reason: ReasonCode | None) -> None:
    decision = check_header(_cr(**attrs))
    assert decision.eligible is (reason is None)
    assert decision.reason == (str(reason) if reason else None)


def test_rules_are_configurable() -> None:
    rules = GateRules.from_lists(["cr"], ["chest"], ["pa"], 512)
    assert not check_header(_cr(ViewPosition="AP"), rules).eligible
    assert not check_header(_cr(Modality="DX"), rules).eligible
    assert check_header(_cr(), rules).eligible


def test_shared_files(shared_dir: Path) -> None:
    for path in sorted((shared_dir / "dicom/chest").glob("*.dcm")):
        assert check_header(dcmread(path, stop_before_pixels=False)).eligible, path.name
    tibia = dcmread(shared_dir / "dicom/not-chest/cr-tibia-j2k-lossless.dcm")
    assert check_header(tibia).reason == ReasonCode.NOT_CHEST
    dog = dcmread(shared_dir / "dicom/not-chest/dx-canine-lateral-thorax.dcm")
    assert not check_header(dog).eligible
