"""The bundle's training reference for the gateway's drift page: ``docs/reference_distribution.json``.

Scores: each finding's distribution of the bundle's probabilities on held-out images (the bundle's own
``docs/test_predictions.csv``, written at export from the patient-wise test split: the training images'
own scores would be optimistic, being fitted), binned at its deciles. Inputs: from the NIH metadata
(``Data_Entry_2017``) of the bundle's training images (``docs/splits.csv``): view, pixel spacing, the
image's longer side. NIH's PNGs carry no manufacturer, modality or photometric interpretation: those items
have no reference. The gateway (service.site.drift) bins its weekly observations on these edges and reports
a population stability index per item.

    python -m monai_train.drift_reference --bundle B [--data-entry Data_Entry_2017_v2020.csv.gz]
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

OUT = Path("docs/reference_distribution.json")


def binned(values: Sequence[float], bins: int) -> dict[str, list[float]]:
    """Quantile edges (duplicates merged) and the fraction of ``values`` in each bin, the first and last
    bins open-ended, a value on an edge in the upper bin (as the gateway bins)."""
    v = np.asarray(values, dtype=np.float64)
    edges = np.unique(np.quantile(v, np.linspace(0.0, 1.0, bins + 1)))
    if len(edges) < 2:
        edges = np.asarray([edges[0], edges[0] + 1e-6])
    index = np.searchsorted(edges[1:-1], v, side="right")
    counts = np.bincount(index, minlength=len(edges) - 1)
    return {"edges": [round(float(e), 6) for e in edges], "fractions": [float(c) / len(v) for c in counts]}


def _read_predictions(path: Path) -> dict[str, list[float]]:
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    labels = [c[len("prob_") :] for c in (rows[0].keys() if rows else []) if c.startswith("prob_")]
    return {label: [float(r[f"prob_{label}"]) for r in rows] for label in labels}


def _training_inputs(bundle: Path, data_entry: Path) -> dict[str, Any]:
    with (bundle / "docs" / "splits.csv").open(newline="") as fh:
        train = {r["Image Index"] for r in csv.DictReader(fh) if r.get("split") == "train"}
    views: Counter[str] = Counter()
    spacing: list[float] = []
    size: list[float] = []
    opener = gzip.open if data_entry.suffix == ".gz" else open
    with opener(data_entry, "rt", newline="") as fh:
        for row in csv.reader(fh):
            if row and row[0] in train:  # Image Index, …, View Position, Width, Height, spacing x, y
                views[row[6].strip().upper() or "(none)"] += 1
                size.append(float(max(int(row[7]), int(row[8]))))
                spacing.append(round(float(row[9]), 3))
    n = sum(views.values())
    if not n:
        return {}
    return {
        "view": {k: c / n for k, c in sorted(views.items())},
        "pixel_spacing_mm": binned(spacing, 5),
        "image_size": binned(size, 5),
    }


def write_reference_distribution(
    bundle: Path, *, predictions: Path | None = None, data_entry: Path | None = None, bins: int = 10
) -> Path:
    """Write ``docs/reference_distribution.json`` into ``bundle``; returns its path."""
    preds = predictions or bundle / "docs" / "test_predictions.csv"
    scores = _read_predictions(preds)
    if not scores:
        raise ValueError(f"{preds}: no prob_<label> columns")
    out: dict[str, Any] = {
        "version": 1,
        "source": f"scores: {preds.name} ({len(next(iter(scores.values())))} held-out images)"
        + (f"; inputs: {data_entry.name} of the training split" if data_entry else ""),
        "scores": {label: binned(values, bins) for label, values in scores.items()},
        "inputs": _training_inputs(bundle, data_entry) if data_entry else {},
    }
    path = bundle / OUT
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m monai_train.drift_reference", description=__doc__)
    p.add_argument("--bundle", type=Path, required=True)
    p.add_argument(
        "--predictions", type=Path, default=None, help="default: <bundle>/docs/test_predictions.csv"
    )
    p.add_argument("--data-entry", type=Path, default=None, help="NIH Data_Entry CSV for the input items")
    p.add_argument("--bins", type=int, default=10)
    args = p.parse_args(argv)
    path = write_reference_distribution(
        args.bundle, predictions=args.predictions, data_entry=args.data_entry, bins=args.bins
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
