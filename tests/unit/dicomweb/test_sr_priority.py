"""The SR's worklist priority hint: the notification rules' own evaluation picks it, and it lands as a
CODE item (SCT 260870009 "Priority" = a CID 3414 code) in TID 1500's Qualitative Evaluations."""

from __future__ import annotations

from pathlib import Path

import pytest
from highdicom.sr import CodedConcept, ContainerContentItem, RelationshipTypeValues
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.core.status import OutputKind
from service.notify.config import NotifyRule
from worker.dicom.priority import add_priority, read_priority
from worker.outputs import Output
from worker.priority import image_priority, mark_priority

IMAGE = {
    "sop_instance_uid": "1.2.3",
    "probabilities": {"Pneumothorax": 0.91, "Mass": 0.55, "Nodule": 0.1},
    "present": ["Pneumothorax"],
}
BUNDLE = {"name": "cxr", "version": "1"}


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        ([], None),
        ([NotifyRule(name="ptx", finding="Pneumothorax", priority="asap")], "asap"),
        (
            [
                NotifyRule(name="mass", finding="Mass", min_score=0.5, priority="routine"),
                NotifyRule(name="ptx", finding="Pneumothorax", priority="stat"),
            ],
            "stat",
        ),
        ([NotifyRule(name="nod", finding="Nodule", priority="stat")], None),  # not present
    ],
)
def test_the_most_urgent_fired_rule_gives_the_priority(rules: list[NotifyRule], expected: str | None) -> None:
    assert image_priority(rules, IMAGE, BUNDLE) == expected


def _sr(tmp_path: Path) -> Path:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.34"
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    evaluations = ContainerContentItem(
        name=CodedConcept("C0034375", "UMLS", "Qualitative Evaluations"),
        relationship_type=RelationshipTypeValues.CONTAINS,
    )
    evaluations.ContentSequence = Sequence()
    ds.ContentSequence = Sequence([evaluations])
    path = tmp_path / "sr.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_the_priority_goes_into_qualitative_evaluations_and_reads_back(tmp_path: Path) -> None:
    path = _sr(tmp_path)
    out = Output(OutputKind.SR, "1.2", path)
    mark_priority([out], None)
    assert read_priority(dcmread(path)) is None
    mark_priority([out, Output(OutputKind.SC, "1.3", tmp_path / "absent.dcm")], "stat")
    ds = dcmread(path)
    assert read_priority(ds) == "stat"
    (item,) = ds.ContentSequence[0].ContentSequence
    assert (item.ValueType, item.RelationshipType) == ("CODE", "CONTAINS")
    name, value = item.ConceptNameCodeSequence[0], item.ConceptCodeSequence[0]
    assert (name.CodeValue, name.CodingSchemeDesignator) == ("260870009", "SCT")
    assert (value.CodeValue, value.CodeMeaning) == ("25876001", "Emergent Procedure")


def test_an_sr_without_the_container_gets_one(tmp_path: Path) -> None:
    ds = dcmread(_sr(tmp_path))
    ds.ContentSequence = Sequence()
    assert read_priority(add_priority(ds, "routine")) == "routine"
