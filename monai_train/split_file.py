"""A bundle's ``docs/splits.csv``: which image and patient trained (train), tuned (val) or measured (test) it.
Fine-tuning, calibration and evaluation read it back to keep a bundle's own patients out of their figures."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the data module pulls in MONAI; readers of the file need none of it
    from monai_train.data import Splits

COLUMNS = ("Image Index", "Patient ID", "split")


def split_path(bundle_dir: Path) -> Path:
    return bundle_dir / "docs" / "splits.csv"


def write_split_file(bundle_dir: Path, splits: Splits) -> None:
    with split_path(bundle_dir).open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(COLUMNS)
        for split_name, recs in splits.items():
            writer.writerows([r.name, r.patient_id, split_name] for r in recs)


def read_split_file(bundle_dir: Path) -> list[tuple[str, str, str]] | None:
    """(image, patient, split) rows, stripped; None when the bundle has no splits file."""
    path = split_path(bundle_dir)
    if not path.is_file():
        return None
    with path.open(newline="") as fh:
        return [(r[COLUMNS[0]].strip(), r[COLUMNS[1]].strip(), r[COLUMNS[2]]) for r in csv.DictReader(fh)]


def split_names(bundle_dir: Path) -> dict[str, set[str]]:
    """split -> its image names; FileNotFoundError without a splits file (the splits are unknown)."""
    rows = read_split_file(bundle_dir)
    if rows is None:
        raise FileNotFoundError(f"{split_path(bundle_dir)} is missing: the bundle's splits are unknown")
    out: dict[str, set[str]] = {}
    for image, _, split in rows:
        out.setdefault(split, set()).add(image)
    return out
