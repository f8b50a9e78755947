"""Fitting per-finding calibration (Platt scaling) on validation logits, and recalibrating a shipped bundle.

The fitted maps are applied by ``worker.inference.calibration.Calibration`` — the worker's own code — both
here and in the worker, so training's evaluation and the served probabilities cannot disagree.

Platt scaling per finding: p = sigmoid(a_l · z + b_l). With ~120 validation images some findings have one
or two positives, where a free (a, b) pair would be fitted to noise, so:

- targets are Platt's smoothed ones, (N+ + 1) / (N+ + 2) and 1 / (N− + 2), never 0 or 1;
- a shared scale a₀ with a bias per finding is fitted first (most of the miscalibration of a class-weighted
  BCE network is a per-finding *shift*), then each finding's scale may move away from a₀ only against a
  penalty ``shrink · (log a − log a₀)²``, so a finding with few positives keeps (nearly) a₀;
- scales are bounded to [0.05, 20]: every map stays increasing, so each operating point has exactly one
  equivalent on the calibrated scale (`Calibration.equivalent_threshold`) and no decision changes.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

from monai_train.metrics import expected_calibration_error
from monai_train.split_file import split_names
from worker.inference.calibration import Calibration

if TYPE_CHECKING:  # the bundle module pulls in torch and MONAI; the functions import it when they run
    from worker.inference.bundle import Bundle

log = logging.getLogger("monai_train")

SHRINK = 10.0
SCALE_BOUNDS = (0.05, 20.0)


def _smoothed_targets(y: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    pos = y.sum(axis=0)
    neg = y.shape[0] - pos
    return np.where(y > 0.5, (pos + 1.0) / (pos + 2.0), 1.0 / (neg + 2.0))


def _nll_and_grad(
    s: npt.NDArray[np.float64], t: npt.NDArray[np.float64]
) -> tuple[float, npt.NDArray[np.float64]]:
    # softplus(s) − t·s = −[t log σ(s) + (1 − t) log(1 − σ(s))]; its derivative is σ(s) − t.
    value = float(np.sum(np.logaddexp(0.0, s) - t * s))
    return value, 0.5 * (1.0 + np.tanh(0.5 * s)) - t


def fit_platt(
    logits: npt.ArrayLike, y: npt.ArrayLike, labels: Sequence[str], *, shrink: float = SHRINK
) -> Calibration:
    """Per-finding Platt scaling of ``logits`` (n, L) against multi-hot ``y`` (n, L); see the module doc."""
    z = np.asarray(logits, dtype=np.float64).reshape(-1, len(labels))
    yy = np.asarray(y, dtype=np.float64).reshape(z.shape)
    if z.shape[0] == 0:
        raise ValueError("cannot fit calibration on an empty validation set")
    t = _smoothed_targets(yy)
    n_labels = len(labels)
    lo, hi = (math.log(b) for b in SCALE_BOUNDS)

    # Stage 1: one scale (as log a) and a bias per finding.
    def shared(params: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.float64]]:
        a, b = math.exp(params[0]), params[1:]
        value, d = _nll_and_grad(a * z + b, t)
        return value, np.concatenate([[float(np.sum(d * z)) * a], d.sum(axis=0)])

    start = np.concatenate([[0.0], np.zeros(n_labels)])
    res = minimize(shared, start, jac=True, method="L-BFGS-B", bounds=[(lo, hi)] + [(None, None)] * n_labels)
    log_a0, b0 = float(res.x[0]), res.x[1:]

    # Stage 2: each finding's own scale, shrunk towards the shared one.
    scales: list[float] = []
    biases: list[float] = []
    for i in range(n_labels):
        zi, ti = z[:, i], t[:, i]

        def own(params: npt.NDArray[np.float64], zi: Any = zi, ti: Any = ti) -> tuple[float, Any]:
            log_a, b = float(params[0]), float(params[1])
            a = math.exp(log_a)
            value, d = _nll_and_grad(a * zi + b, ti)
            value += shrink * (log_a - log_a0) ** 2
            grad = np.array([float(np.sum(d * zi)) * a + 2 * shrink * (log_a - log_a0), float(np.sum(d))])
            return value, grad

        r = minimize(
            own, np.array([log_a0, b0[i]]), jac=True, method="L-BFGS-B", bounds=[(lo, hi), (None, None)]
        )
        scales.append(float(math.exp(r.x[0])))
        biases.append(float(r.x[1]))
    return Calibration("platt", tuple(labels), tuple(scales), tuple(biases), calibrated=True)


def per_label_ece(y: npt.ArrayLike, p: npt.ArrayLike, labels: Sequence[str]) -> dict[str, float]:
    yy = np.asarray(y, dtype=np.float64).reshape(-1, len(labels))
    pp = np.asarray(p, dtype=np.float64).reshape(yy.shape)
    return {lb: round(expected_calibration_error(yy[:, i], pp[:, i]), 6) for i, lb in enumerate(labels)}


# ---------------------------------------------------------------------------------------------- a bundle


def recalibrate_bundle(
    bundle_dir: Path,
    images: Sequence[Path],
    labels_csvs: Sequence[Path],
    *,
    write: bool,
    threads: int = 0,
    shrink: float = SHRINK,
    version: str | None = None,
) -> dict[str, Any]:
    """Fit Platt scaling on the bundle's own validation split (``docs/splits.csv``), measure ECE on its
    test split, and — with ``write`` and only when the test ECE falls — store it in the bundle.

    Writing keeps every decision: operating points are re-expressed on the calibrated scale, and
    ``docs/test_predictions.csv`` and ``docs/metrics.json`` are rewritten with the calibrated values.
    """
    from monai_train.data import combine, load_image, read_records
    from worker.inference.bundle import load_bundle
    from worker.inference.predictor import Predictor

    bundle = load_bundle(bundle_dir)
    if bundle.calibration is not None and bundle.calibration.method == "platt":
        raise ValueError(f"{bundle_dir} is already Platt-calibrated; recalibrate the uncalibrated bundle")
    splits = split_names(bundle_dir)
    records = combine(
        read_records(i, c, bundle.labels, missing="skip") for i, c in zip(images, labels_csvs, strict=True)
    )
    predictor = Predictor(bundle, threads=threads)
    raw = Calibration.temperature(bundle.labels, 1.0)

    def logits_of(split: str) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], list[str]]:
        recs = [r for r in records if r.name in splits.get(split, set())]
        if not recs:
            raise ValueError(f"none of the bundle's {split} images is in the given folders")
        zs = []
        for start in range(0, len(recs), 16):
            x = predictor.prepare([load_image(r.image) for r in recs[start : start + 16]])
            zs.append(predictor_logits(predictor, x))
        return np.concatenate(zs), np.asarray([r.labels for r in recs], np.float64), [r.name for r in recs]

    val_z, val_y, _ = logits_of("val")
    test_z, test_y, test_names = logits_of("test")
    before = bundle.calibration or Calibration.temperature(bundle.labels, bundle.temperature)
    platt = fit_platt(val_z, val_y, bundle.labels, shrink=shrink)
    report: dict[str, Any] = {
        "bundle": str(bundle_dir),
        "method": "platt",
        "shrink": shrink,
        "fitted_on": {"split": "val", "images": len(val_y)},
        "measured_on": {"split": "test", "images": len(test_y)},
        "ece_test": {
            "raw_sigmoid": round(expected_calibration_error(test_y, raw.probabilities(test_z)), 6),
            "before": round(expected_calibration_error(test_y, before.probabilities(test_z)), 6),
            "after": round(expected_calibration_error(test_y, platt.probabilities(test_z)), 6),
        },
        "ece_val": {
            "before": round(expected_calibration_error(val_y, before.probabilities(val_z)), 6),
            "after": round(expected_calibration_error(val_y, platt.probabilities(val_z)), 6),
        },
        "ece_test_per_label": {
            "before": per_label_ece(test_y, before.probabilities(test_z), bundle.labels),
            "after": per_label_ece(test_y, platt.probabilities(test_z), bundle.labels),
        },
        "calibration": platt.as_metadata(),
    }
    holds = report["ece_test"]["after"] < report["ece_test"]["before"]
    report["holds_on_test"] = holds
    report["written"] = False
    if write and holds:
        _write_calibration(bundle_dir, bundle, before, platt, report, (test_z, test_y, test_names), version)
    return report


def _write_calibration(
    bundle_dir: Path,
    bundle: Bundle,
    before: Calibration,
    platt: Calibration,
    report: dict[str, Any],
    test: tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], list[str]],
    version: str | None,
) -> None:
    """Store the calibration: metadata (operating points re-expressed on the calibrated scale), metrics
    and test predictions rewritten with the calibrated values; an int8 graph's check is void now."""
    from monai_train.metrics import compute_metrics
    from worker.inference.bundle import INT8_WEIGHTS

    test_z, test_y, test_names = test
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    new_points = {
        lb: before.equivalent_threshold(platt, lb, bundle.operating_points[lb]) for lb in bundle.labels
    }
    meta["operating_points"] = new_points
    if version:
        meta["version"] = version
    meta["calibration"] = {
        **platt.as_metadata(),
        "fitted_on": report["fitted_on"],
        "shrink": report["shrink"],
        "ece_test_before": report["ece_test"]["before"],
        "ece_test_after": report["ece_test"]["after"],
        "note": "p = sigmoid(scale * logit + bias) per finding; 'temperature' is superseded",
    }
    p_test = platt.probabilities(test_z)
    metrics = compute_metrics(test_y, p_test, bundle.labels, new_points)
    old = dict(meta.get("metrics") or {})
    for key in ("split", "operating_point_method", "validation", "reference_comparison"):
        if key in old:
            metrics[key] = old[key]
    metrics["ece_before_calibration"] = report["ece_test"]["before"]
    meta["metrics"] = metrics
    if meta.pop("int8", None) is not None or (bundle_dir / INT8_WEIGHTS).exists():
        # Its agreement was measured on the old probabilities: run `monai_train quantize` again.
        (bundle_dir / INT8_WEIGHTS).unlink(missing_ok=True)
        report["int8_removed"] = True
        log.warning("%s: int8 graph removed with the new calibration; run quantize again", bundle_dir)
    (bundle_dir / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
    (bundle_dir / "docs" / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    order = {n: i for i, n in enumerate(test_names)}
    pred_path = bundle_dir / "docs" / "test_predictions.csv"
    if pred_path.is_file():
        with pred_path.open(newline="") as fh:
            names = [row["Image Index"] for row in csv.DictReader(fh)]
        names = [n for n in names if n in order] + [n for n in test_names if n not in set(names)]
    else:
        names = test_names
    with pred_path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", *(f"prob_{lb}" for lb in bundle.labels)])
        for name in names:
            writer.writerow([name, *(f"{v:.6f}" for v in p_test[order[name]])])
    report["written"] = True
    report["operating_points"] = new_points


def predictor_logits(predictor: Any, x: Any) -> npt.NDArray[np.float64]:
    """Raw logits of the worker's Predictor for a prepared batch (the network the worker runs)."""
    import torch

    with torch.inference_mode():
        return np.asarray(predictor.net(x).float().cpu().numpy(), dtype=np.float64)
