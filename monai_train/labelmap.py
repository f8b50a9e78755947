"""Labels from any CSV: a mapping file says which columns hold what, and how to read them.

The NIH shape (``Image Index``, ``Finding Labels`` with ``|``, ``Patient ID``) is the default mapping. A site
writes a JSON file for its own export, e.g. CheXpert-style, one column per finding with 1 / 0 / −1 / blank::

    {
      "image_column": "Path",
      "patient_column": "PatientID",
      "finding_columns": {"Effusion": "Pleural Effusion", "Cardiomegaly": "Cardiomegaly"},
      "uncertain": "negative",
      "split_column": "Split"
    }

or one column listing findings, with the site's names mapped onto the model's::

    {"image_column": "file", "findings_column": "labels", "separator": ";",
     "synonyms": {"Infiltrate": "Infiltration", "Pleural effusion": "Effusion"},
     "no_finding": ["Normal", "No Finding"], "patient_column": "mrn"}

Keys: ``image_column`` (file name, its stem or, for DICOM folders, the SOP Instance UID);
``patient_column`` (optional for DICOM folders, whose headers name the patient); exactly one of
``findings_column`` (+ ``separator``) or ``finding_columns`` (finding → column); ``positive_values`` and
``uncertain_values`` (cell values, case-insensitive); ``uncertain``: ``"negative"`` (U-Zeros) or
``"positive"`` (U-Ones) — what an uncertain mention counts as; ``synonyms`` (site name → finding);
``no_finding`` (names that mean "nothing found"); ``split_column`` with values train / val / test (also
training, valid, validation, tune, holdout): a predefined split, still checked for patient leakage.
An unknown key is an error, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPLIT_SYNONYMS = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "tune": "val",
    "dev": "val",
    "test": "test",
    "holdout": "test",
}
UNCERTAIN_POLICIES = ("negative", "positive")


class LabelMapError(ValueError):
    """The mapping file is malformed or does not fit the CSV."""


@dataclass(frozen=True)
class LabelMap:
    image_column: str = "Image Index"
    patient_column: str | None = "Patient ID"
    findings_column: str | None = "Finding Labels"
    separator: str = "|"
    finding_columns: Mapping[str, str] = field(default_factory=dict)
    positive_values: frozenset[str] = frozenset({"1", "1.0", "true", "yes", "y", "positive", "pos"})
    uncertain_values: frozenset[str] = frozenset({"-1", "-1.0", "uncertain", "u"})
    uncertain: str = "negative"
    synonyms: Mapping[str, str] = field(default_factory=dict)
    no_finding: frozenset[str] = frozenset({"No Finding"})
    split_column: str | None = None

    def __post_init__(self) -> None:
        if self.uncertain not in UNCERTAIN_POLICIES:
            raise LabelMapError(f"'uncertain' must be one of {UNCERTAIN_POLICIES}, got {self.uncertain!r}")
        if bool(self.findings_column) == bool(self.finding_columns):
            raise LabelMapError("give exactly one of 'findings_column' and 'finding_columns'")

    @classmethod
    def from_file(cls, path: Path) -> LabelMap:
        try:
            raw = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LabelMapError(f"cannot read the label mapping {path}: {exc}") from exc
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LabelMap:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise LabelMapError(f"unknown keys in the label mapping: {unknown} (known: {sorted(known)})")
        values: dict[str, Any] = dict(raw)
        if "finding_columns" in values and "findings_column" not in values:
            values["findings_column"] = None
        for key in ("positive_values", "uncertain_values"):
            if key in values:
                values[key] = frozenset(str(v).strip().lower() for v in values[key])
        if "no_finding" in values:
            names = values["no_finding"]
            values["no_finding"] = frozenset([names] if isinstance(names, str) else names)
        return cls(**values)

    def required_columns(self, *, patient: bool = True) -> set[str]:
        cols = {self.image_column}
        if patient and self.patient_column:
            cols.add(self.patient_column)
        if self.findings_column:
            cols.add(self.findings_column)
        cols.update(self.finding_columns.values())
        if self.split_column:
            cols.add(self.split_column)
        return cols

    def canonical(self, name: str) -> str:
        return self.synonyms.get(name, name)

    def named(self, row: Mapping[str, str]) -> set[str]:
        """Every finding the row's CSV can name (after synonyms): what a label set may ask for."""
        if self.finding_columns:
            return set(self.finding_columns)
        return {self.canonical(n) for n in self._listed(row)} - set(self.no_finding)

    def _listed(self, row: Mapping[str, str]) -> list[str]:
        assert self.findings_column is not None
        return [n.strip() for n in (row.get(self.findings_column) or "").split(self.separator) if n.strip()]

    def findings(self, row: Mapping[str, str]) -> tuple[str, ...]:
        """The findings present in ``row`` (canonical names; uncertain ones per the policy)."""
        if self.finding_columns:
            present = []
            for finding, column in self.finding_columns.items():
                value = (row.get(column) or "").strip().lower()
                if value in self.positive_values or (
                    value in self.uncertain_values and self.uncertain == "positive"
                ):
                    present.append(finding)
            return tuple(present)
        return tuple(
            self.canonical(n) for n in self._listed(row) if n not in self.no_finding and self.canonical(n)
        )

    def patient(self, row: Mapping[str, str]) -> str:
        return (row.get(self.patient_column) or "").strip() if self.patient_column else ""

    def split(self, row: Mapping[str, str]) -> str:
        """'train', 'val', 'test', or '' without a split column."""
        if not self.split_column:
            return ""
        raw = (row.get(self.split_column) or "").strip().lower()
        if raw not in SPLIT_SYNONYMS:
            raise LabelMapError(
                f"split column {self.split_column!r} holds {raw!r}; expected one of {sorted(SPLIT_SYNONYMS)}"
            )
        return SPLIT_SYNONYMS[raw]


NIH = LabelMap()
