"""A reference model's probabilities (the CheXNet reproduction's CSV): read, and compared with a model's on
the images both scored."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from monai_train.metrics import compute_metrics


def read_reference(csv_path: Path, labels: Sequence[str]) -> dict[str, npt.NDArray[np.float64]]:
    """Image name → probabilities in ``labels`` order from a CSV with ``Image Index`` + ``prob_<label>``."""
    out: dict[str, npt.NDArray[np.float64]] = {}
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        missing = [lb for lb in labels if f"prob_{lb}" not in cols and lb not in cols]
        if missing:
            raise ValueError(f"{csv_path} has no column for {missing}")
        for row in reader:
            out[row["Image Index"].strip()] = np.asarray(
                [float(row.get(f"prob_{lb}", row.get(lb, "nan"))) for lb in labels], dtype=np.float64
            )
    return out


def reference_comparison(
    names: Sequence[str], y: npt.ArrayLike, p: npt.ArrayLike, labels: Sequence[str], csv_path: Path
) -> dict[str, Any]:
    """Model vs reference AUROC on the images present in both (the reference CSV covers a subset)."""
    ref = read_reference(csv_path, labels)
    idx = [i for i, n in enumerate(names) if n in ref]
    yy = np.asarray(y)[idx]
    model = compute_metrics(yy, np.asarray(p)[idx], labels)
    reference = compute_metrics(
        yy, np.stack([ref[names[i]] for i in idx]) if idx else np.zeros((0, len(labels))), labels
    )
    return {
        "reference_csv": str(csv_path),
        "n_images": len(idx),
        "model": {"auroc": model["auroc"], "mean_auroc": model["mean_auroc"]},
        "reference": {"auroc": reference["auroc"], "mean_auroc": reference["mean_auroc"]},
        "notes": model["notes"][2:],
    }
