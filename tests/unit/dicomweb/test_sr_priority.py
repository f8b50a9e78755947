"""The SR's worklist priority hint: the notification rules' own evaluation picks it (its place in the
findings SR is tested with the builder, tests/unit/dicom/test_dicom_sr.py)."""

from __future__ import annotations

import pytest

from service.notify.config import NotifyRule
from worker.priority import image_priority

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
