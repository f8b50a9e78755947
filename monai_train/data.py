"""Training data: NIH-format label CSVs + image folders → records, patient-wise splits, image loading.

Images become display arrays through the worker's own rendering chain (``worker.imaging``): 2-D float32 in
[0, 1], MONOCHROME2 sense, identical to what the worker analyses for the same file.
The bundle's preprocessing (``monai_train.bundle.build_preprocessing``) is applied after this loader.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import logging
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image

from monai_train.bundle import NIH_LABELS
from monai_train.labelmap import NIH, LabelMap, LabelMapError
from worker.imaging import display_from_pil, read_display_file

log = logging.getLogger(__name__)

FloatImage = npt.NDArray[np.float32]

IMAGE_COLUMN = "Image Index"
FINDINGS_COLUMN = "Finding Labels"
PATIENT_COLUMN = "Patient ID"
NO_FINDING = "No Finding"
IMAGE_SUFFIXES = (".png", ".dcm", ".dicom")


class DataError(ValueError):
    """The label CSV or image folder cannot be turned into training records."""


class LeakageError(ValueError):
    """A patient appears in more than one split."""


@dataclass(frozen=True)
class Record:
    image: Path
    patient_id: str
    labels: tuple[int, ...]  # multi-hot, in the order of the label set it was read with
    findings: tuple[str, ...]  # every NIH finding named in the CSV row (for summaries)
    source: str = ""  # which dataset the record came from (for split stratification)
    split: str = ""  # a predefined split from the label file ('train' / 'val' / 'test'), if any

    @property
    def name(self) -> str:
        return self.image.name


@dataclass
class Splits:
    train: list[Record] = field(default_factory=list)
    val: list[Record] = field(default_factory=list)
    test: list[Record] = field(default_factory=list)

    def items(self) -> list[tuple[str, list[Record]]]:
        return [("train", self.train), ("val", self.val), ("test", self.test)]


# ---------------------------------------------------------------------------------------------- labels


def parse_label_set(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"nih14"`` → the 14 NIH findings; ``"Pneumothorax"`` or ``"Effusion,Edema"`` → that list."""
    if isinstance(spec, str):
        if spec.strip().lower() in {"nih14", "nih", "all"}:
            return NIH_LABELS
        names = [s.strip() for s in spec.split(",") if s.strip()]
    else:
        names = [str(s).strip() for s in spec]
    if not names:
        raise DataError("the label set is empty")
    by_lower = {lb.lower(): lb for lb in NIH_LABELS}
    # Accept any capitalisation of NIH names, but keep unknown names as given: a label set is
    # configuration, and a CSV may carry findings beyond NIH's 14.
    canonical = tuple(by_lower.get(n.lower(), n) for n in names)
    if len(set(canonical)) != len(canonical):
        raise DataError(f"duplicate labels in label set {canonical}")
    if NO_FINDING in canonical:
        raise DataError("'No Finding' is the absence of labels, not a label")
    return canonical


def multi_hot(findings: Iterable[str], labels: Sequence[str]) -> tuple[int, ...]:
    present = set(findings)
    return tuple(int(lb in present) for lb in labels)


# ---------------------------------------------------------------------------------------------- reading


def _find_image(folder: Path, name: str) -> Path | None:
    direct = folder / name
    if direct.is_file():
        return direct
    # A DICOM folder labelled by the NIH CSV: 00000001_000.png ↔ 00000001_000.dcm.
    stem = Path(name).stem
    for suffix in IMAGE_SUFFIXES:
        candidate = folder / f"{stem}{suffix}"
        if candidate.is_file():
            return candidate
    return None


def read_records(
    images: Path,
    labels_csv: Path,
    label_set: Sequence[str] = NIH_LABELS,
    *,
    source: str | None = None,
    missing: str = "error",
    label_map: LabelMap = NIH,
) -> list[Record]:
    """Read one label CSV (NIH's shape, or any through ``label_map``); rows whose image is absent raise
    (``missing="error"``) or are skipped."""
    if not labels_csv.is_file():
        raise DataError(f"label CSV not found: {labels_csv}")
    if not images.is_dir():
        raise DataError(f"image folder not found: {images}")
    src = source if source is not None else images.parent.name or str(images)
    records: list[Record] = []
    absent: list[str] = []
    seen_findings: set[str] = set()
    # The full NIH label file ships gzipped (Data_Entry_2017_v2020.csv.gz): read it as it is.
    opener = gzip.open if labels_csv.suffix == ".gz" else open
    with opener(labels_csv, "rt", newline="") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or ())
        need = label_map.required_columns()
        if not need <= columns:
            raise DataError(f"{labels_csv} lacks columns {sorted(need - columns)}")
        for row in reader:
            name = row[label_map.image_column].strip()
            seen_findings.update(label_map.named(row))
            path = _find_image(images, name)
            if path is None:
                absent.append(name)
                continue
            findings = label_map.findings(row)
            try:
                split = label_map.split(row)
            except LabelMapError as exc:
                raise DataError(f"{labels_csv}, image {name}: {exc}") from exc
            records.append(
                Record(
                    image=path,
                    patient_id=label_map.patient(row),
                    labels=multi_hot(findings, label_set),
                    findings=findings,
                    source=src,
                    split=split,
                )
            )
    # NIH's file names its 14 findings by construction; any other mapping must name each label it trains.
    exempt = set(NIH_LABELS) if label_map == NIH else set()
    unknown = [lb for lb in label_set if lb not in exempt and lb not in seen_findings]
    if unknown:
        # A label no row names would be an output trained on negatives only: refuse it.
        raise DataError(
            f"label set names {unknown}: not found in {labels_csv} through its label mapping "
            f"(its findings: {sorted(seen_findings - {NO_FINDING})[:20]})"
        )
    if absent and missing == "error":
        raise DataError(f"{len(absent)} images named in {labels_csv} are not in {images}: {absent[:3]}…")
    if absent:
        log.warning("%d images named in %s are not in %s; skipped", len(absent), labels_csv, images)
    if not records:
        raise DataError(
            f"no image named in {labels_csv} is in {images} "
            f"(first unmatched: {', '.join(absent[:5]) or 'none'})"
        )
    return records


def combine(datasets: Iterable[Sequence[Record]]) -> list[Record]:
    """Concatenate datasets; an image name seen twice (the same NIH image at two sizes) is kept once."""
    seen: dict[str, Record] = {}
    for records in datasets:
        for rec in records:
            if rec.name in seen:
                log.warning(
                    "image %s appears in %s and %s: keeping the first",
                    rec.name,
                    seen[rec.name].source,
                    rec.source,
                )
                continue
            seen[rec.name] = rec
    return list(seen.values())


# ---------------------------------------------------------------------------------------------- splits


def split_by_patient(
    records: Sequence[Record],
    fractions: tuple[float, float, float] = (0.7, 0.1, 0.2),
    seed: int = 0,
    *,
    stratify_by_source: bool = True,
) -> Splits:
    """Assign whole patients to train/val/test with the given fractions of patients.

    With ``stratify_by_source`` each dataset is split with the same fractions, so a small curated set
    (e.g. the 321 dev images) keeps a test portion of its own. A patient found in several datasets goes
    to the stratum of its first record, so it still lands in exactly one split.
    """
    if len(fractions) != 3 or any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {fractions}")
    patients: dict[str, list[Record]] = {}
    for rec in records:
        patients.setdefault(rec.patient_id, []).append(rec)
    strata: dict[str, list[str]] = {}
    for pid, recs in patients.items():
        key = recs[0].source if stratify_by_source else ""
        strata.setdefault(key, []).append(pid)
    rng = random.Random(seed)
    assignment: dict[str, str] = {}
    for key in sorted(strata):
        pids = sorted(strata[key])
        rng.shuffle(pids)
        n = len(pids)
        n_test = round(n * fractions[2])
        n_val = round(n * fractions[1])
        # Small strata: never leave train empty when there are patients to spare.
        if n_test + n_val >= n and n > 0 and fractions[0] > 0:
            n_test = min(n_test, max(0, n - 1 - n_val))
            n_val = min(n_val, max(0, n - 1 - n_test))
        for i, pid in enumerate(pids):
            assignment[pid] = "test" if i < n_test else "val" if i < n_test + n_val else "train"
    splits = Splits()
    for rec in records:
        getattr(splits, assignment[rec.patient_id]).append(rec)
    check_no_leakage(splits)
    return splits


def splits_from_column(records: Sequence[Record]) -> Splits:
    """The label file's own split (``split_column`` of the mapping), checked for patient leakage."""
    unset = [r.name for r in records if not r.split]
    if unset:
        raise DataError(f"{len(unset)} images have no predefined split (e.g. {unset[:3]})")
    splits = Splits()
    for rec in records:
        getattr(splits, rec.split).append(rec)
    check_no_leakage(splits)
    return splits


def check_no_leakage(splits: Splits | dict[str, Sequence[Record]]) -> None:
    """Raise `LeakageError` when any patient (or image) is in more than one split."""
    named = splits.items() if isinstance(splits, Splits) else list(splits.items())
    owner: dict[str, str] = {}
    overlapping: dict[str, set[str]] = {}
    image_owner: dict[str, str] = {}
    dup_images: set[str] = set()
    for split_name, recs in named:
        for rec in recs:
            first = owner.setdefault(rec.patient_id, split_name)
            if first != split_name:
                overlapping.setdefault(rec.patient_id, {first}).add(split_name)
            if image_owner.setdefault(rec.name, split_name) != split_name:
                dup_images.add(rec.name)
    if overlapping:
        example = sorted(overlapping)[:5]
        raise LeakageError(
            f"patient leakage: {len(overlapping)} patients appear in more than one split "
            f"(e.g. {', '.join(f'{p} in {sorted(overlapping[p])}' for p in example)})"
        )
    if dup_images:
        raise LeakageError(f"image leakage: {len(dup_images)} images appear in more than one split")


# ---------------------------------------------------------------------------------------------- summary


def data_summary(records: Sequence[Record], label_set: Sequence[str]) -> dict[str, object]:
    """Counts, patients, prevalence and a sha256 that identifies the exact (image, labels) list."""
    digest = hashlib.sha256()
    for name, labels in sorted(
        (r.name, "|".join(lb for lb, v in zip(label_set, r.labels, strict=True) if v)) for r in records
    ):
        digest.update(f"{name}\t{labels}\n".encode())
    y = np.asarray([r.labels for r in records], dtype=np.float64).reshape(len(records), len(label_set))
    positives = y.sum(axis=0) if len(records) else np.zeros(len(label_set))
    return {
        "images": len(records),
        "patients": len({r.patient_id for r in records}),
        "sha256": digest.hexdigest(),
        "positives": {lb: int(p) for lb, p in zip(label_set, positives, strict=True)},
        "prevalence": {
            lb: round(float(p) / max(len(records), 1), 4) for lb, p in zip(label_set, positives, strict=True)
        },
        "sources": {s: sum(r.source == s for r in records) for s in sorted({r.source for r in records})},
    }


# ---------------------------------------------------------------------------------------------- images


def load_image(path: Path | str) -> FloatImage:
    """Read a PNG/JPEG or DICOM as 2-D float32 in [0, 1], MONOCHROME2 sense, through the worker's own
    rendering chain (`worker.imaging.read_display_file`): the same pixels the worker would analyse."""
    return read_display_file(path).pixels


def pil_to_display(im: Image.Image) -> FloatImage:
    """A Pillow image as display pixels (`worker.imaging.display_from_pil`)."""
    return display_from_pil(im)


def load_dicom(path: Path) -> FloatImage:
    """DICOM → display pixels: modality LUT, VOI LUT / window (else a percentile stretch), MONOCHROME1 and
    the inversion heuristic — the worker's `read_display_pixels`, not a copy."""
    return read_display_file(path).pixels
