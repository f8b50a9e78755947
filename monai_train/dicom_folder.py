"""A hospital's DICOM folders as training input, through the worker's own input gate.

Every file under the folder (any depth) is read header-only; the worker's gate (`worker.gate.check_header`:
SOP class, modality, species, body part, frontal view, one grey frame, minimum size) decides, with the
same coded reasons the worker writes into its not-analysed reports, and each rejection is counted. The
patient comes from the header's Patient ID (the CSV's ``Patient ID`` only where the header has none), so a
patient-wise split follows the PACS, not a spreadsheet. Labels come from a CSV whose ``Image Index`` names
the file (with or without its suffix) or its SOP Instance UID. Pixels are read later, through the worker's
rendering chain (`worker.imaging`), when the disk cache is built.
"""

from __future__ import annotations

import csv
import gzip
import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pydicom

from monai_train.data import DataError, Record, multi_hot
from monai_train.labelmap import NIH, LabelMap, LabelMapError
from worker.gate import GateRules, check_header
from worker.imaging import is_dicom_file

log = logging.getLogger(__name__)

NOT_DICOM = "not_dicom"
NO_LABELS = "no_labels"
NO_PATIENT_ID = "no_patient_id"


@dataclass
class DicomFolderReport:
    files: int = 0
    accepted: int = 0
    rejected: dict[str, int] = field(default_factory=dict)  # reason → count
    examples: dict[str, list[str]] = field(default_factory=dict)
    views: dict[str, int] = field(default_factory=dict)

    def as_json(self) -> dict[str, object]:
        return {
            "files": self.files,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "examples": self.examples,
            "views": self.views,
        }


def is_dicom_folder(folder: Path, probe: int = 50) -> bool:
    """True when the folder's files (the first ``probe``, any depth) are DICOM rather than PNG/JPEG."""
    files = [p for p in sorted(folder.rglob("*")) if p.is_file()][:probe]
    return bool(files) and sum(is_dicom_file(p) for p in files) > len(files) / 2


def _read_labels(labels_csv: Path, label_map: LabelMap) -> dict[str, dict[str, str]]:
    opener = gzip.open if labels_csv.suffix == ".gz" else open
    with opener(labels_csv, "rt", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        need = label_map.required_columns(patient=False)
        if not need <= columns:
            raise DataError(f"{labels_csv} lacks columns {sorted(need - columns)}")
        rows: dict[str, dict[str, str]] = {}
        for row in reader:
            name = row[label_map.image_column].strip()
            rows[name] = row
            rows.setdefault(Path(name).stem, row)
        return rows


def read_dicom_folder(
    folder: Path,
    labels_csv: Path,
    label_set: Sequence[str],
    *,
    rules: GateRules | None = None,
    source: str | None = None,
    label_map: LabelMap = NIH,
) -> tuple[list[Record], DicomFolderReport]:
    """Records for the gated DICOM files of ``folder`` (recursively), and what was refused, by reason."""
    if not folder.is_dir():
        raise DataError(f"image folder not found: {folder}")
    labels = _read_labels(labels_csv, label_map)
    src = source if source is not None else folder.name
    report = DicomFolderReport()
    rejected: Counter[str] = Counter()
    views: Counter[str] = Counter()
    records: list[Record] = []

    def reject(reason: str, path: Path) -> None:
        rejected[reason] += 1
        report.examples.setdefault(reason, [])
        if len(report.examples[reason]) < 3:
            report.examples[reason].append(str(path.relative_to(folder)))

    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        report.files += 1
        try:
            ds = pydicom.dcmread(str(path), stop_before_pixels=False, defer_size=1024)
        except Exception:  # not DICOM, or a header pydicom cannot parse
            reject(NOT_DICOM, path)
            continue
        decision = check_header(ds, rules)
        if not decision.eligible:
            reject(str(decision.reason), path)
            continue
        row = labels.get(path.name) or labels.get(path.stem) or labels.get(str(ds.get("SOPInstanceUID", "")))
        if row is None:
            reject(NO_LABELS, path)
            continue
        patient = str(ds.get("PatientID", "") or "").strip() or label_map.patient(row)
        if not patient:
            reject(NO_PATIENT_ID, path)
            continue
        findings = label_map.findings(row)
        try:
            split = label_map.split(row)
        except LabelMapError as exc:
            raise DataError(f"{labels_csv}, {path.name}: {exc}") from exc
        views[str(ds.get("ViewPosition", "") or "unknown").strip().upper() or "unknown"] += 1
        records.append(
            Record(
                image=path,
                patient_id=patient,
                labels=multi_hot(findings, label_set),
                findings=findings,
                source=src,
                split=split,
            )
        )
    report.accepted = len(records)
    report.rejected = dict(sorted(rejected.items()))
    report.views = dict(sorted(views.items()))
    if rejected:
        log.warning(
            "%s: %d of %d files refused (%s)",
            folder,
            sum(rejected.values()),
            report.files,
            ", ".join(f"{reason} {n}" for reason, n in sorted(rejected.items())),
        )
    if not records:
        raise DataError(
            f"no DICOM file in {folder} passed the gate with a label row: refused {report.rejected}"
        )
    return records, report
