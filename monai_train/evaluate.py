"""Evaluating a bundle exactly as the worker runs it.

Only the bundle is loaded, through the worker's own loader and Predictor (``worker.inference``), so
preprocessing, weights (fp16 → fp32) and temperature are the worker's by construction, not a copy.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from monai_train.data import load_image, read_records
from monai_train.metrics import compute_metrics, write_curves
from monai_train.train import reference_comparison
from worker.inference.bundle import load_bundle
from worker.inference.predictor import Predictor

log = logging.getLogger("monai_train")

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "worker" / "bundles" / "cxr14_densenet121"


def _safe(name: str) -> str:
    # Finding names become file names; NIH's have no separators, but a custom label set might.
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def evaluate(
    images: Path,
    labels_csv: Path,
    out: Path,
    *,
    bundle_dir: Path = DEFAULT_BUNDLE,
    heatmaps: Path | None = None,
    reference_csv: Path | None = None,
    batch_size: int = 16,
    threads: int = 0,
) -> dict[str, Any]:
    """Write ``out`` (metrics.json) plus ``<stem>_roc.png``, ``<stem>_pr.png`` and
    ``<stem>_predictions.csv`` beside it; with ``heatmaps``, ``<dir>/<image stem>/<finding>.npy``."""
    bundle = load_bundle(bundle_dir)
    predictor = Predictor(bundle, threads=threads)
    # Rows of a larger CSV (e.g. the full NIH file) whose image is not in the folder are skipped.
    records = read_records(images, labels_csv, bundle.labels, missing="skip")
    t0 = time.monotonic()
    probs: list[np.ndarray] = []
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        pred = predictor.predict([load_image(r.image) for r in chunk])
        probs.append(pred.probabilities)
        if heatmaps is not None:
            for rec, cams in zip(chunk, pred.cams, strict=True):
                folder = heatmaps / rec.image.stem
                folder.mkdir(parents=True, exist_ok=True)
                for label, cam in zip(bundle.labels, cams, strict=True):
                    np.save(folder / f"{_safe(label)}.npy", cam.astype(np.float32))
        log.info("evaluated %d/%d images", min(start + batch_size, len(records)), len(records))
    p = np.concatenate(probs)
    y = np.asarray([r.labels for r in records], dtype=np.float32)
    names = [r.name for r in records]
    metrics = compute_metrics(y, p, bundle.labels, bundle.operating_points)
    metrics["bundle"] = {
        "path": str(bundle_dir),
        "name": bundle.name,
        "version": bundle.version,
        "sha256": bundle.sha256,
        "temperature": bundle.temperature,
    }
    metrics["images"] = str(images)
    metrics["labels_csv"] = str(labels_csv)
    metrics["seconds"] = round(time.monotonic() - t0, 2)
    if reference_csv is not None:
        metrics["reference_comparison"] = reference_comparison(names, y, p, bundle.labels, reference_csv)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    write_curves(y, p, bundle.labels, out.parent, prefix=f"{out.stem}_")
    with (out.parent / f"{out.stem}_predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", *(f"prob_{lb}" for lb in bundle.labels)])
        for name, row in zip(names, p, strict=True):
            writer.writerow([name, *(f"{v:.6f}" for v in row)])
    return metrics
