"""Training a MONAI DenseNet-121 bundle: the same preprocessing the worker runs, then calibration and export.

Flow: records → patient-wise splits → disk cache (``cache``: the worker's rendering + the bundle's
preprocessing, once per image) → ``loop.fit`` (best epoch by validation mean AUROC) → temperature and
per-finding Platt scaling on validation logits → per-label operating points on calibrated validation
probabilities → metrics on the held-out test split → ``export_bundle`` with the model card (``card``).
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from monai_train.bundle import build_network, export_bundle, inference_config
from monai_train.cache import CachedImages, cache_splits
from monai_train.calibrate import fit_platt
from monai_train.card import fmt, model_card
from monai_train.config import TrainConfig, TrainingStopped, TrainResult, train_settings
from monai_train.data import Splits, check_no_leakage, data_summary
from monai_train.distributed import init_distributed, training_device
from monai_train.drift_reference import write_reference_distribution
from monai_train.loop import fit, predict_logits, sigmoid
from monai_train.metrics import choose_operating_points, compute_metrics, fit_temperature, write_curves
from monai_train.network import check_finetune_leakage, init_from_bundle
from monai_train.reference import reference_comparison
from monai_train.split_file import write_split_file
from worker.inference.calibration import Calibration
from worker.inference.networks import feature_stride

log = logging.getLogger("monai_train")


@dataclass
class Measured:
    """The best epoch's network calibrated on validation and measured on test."""

    temperature: float
    calibration: Calibration
    points: dict[str, float]
    metrics: dict[str, Any]
    test_names: list[str]
    test_y: npt.NDArray[np.float32]
    test_p: npt.NDArray[np.float32]
    n_val: int


def _network(tc: TrainConfig) -> tuple[torch.nn.Module, dict[str, Any], list[str]]:
    """(network, inference config, labels whose output neurons a fine-tuning start kept)."""
    if tc.init_from is not None:
        net, cfg, shared = init_from_bundle(tc.init_from, tc.labels, tc.image_size, tc.feature_stride or None)
        tc.image_size = int(cfg["image_size"])
        tc.feature_stride = feature_stride(cfg["network_def"].get("pool_free_transitions", ()))
        log.info("fine-tuning from %s; output neurons kept for %s", tc.init_from, shared or "no label")
        return net, cfg, shared
    torch.manual_seed(tc.seed)
    cfg = inference_config(len(tc.labels), tc.image_size, tc.feature_stride, tc.histogram_equalise, tc.clahe)
    return build_network(cfg), cfg, []


def _calibration_holds(metrics: dict[str, Any], calibration: Calibration) -> bool:
    """The outputs are called probabilities only when calibration holds on the held-out test split."""
    after, before = metrics["ece"], metrics["ece_before_calibration"]
    return calibration.method == "platt" and after is not None and before is not None and after < before


def calibrate_and_measure(
    net: torch.nn.Module, val_ds: CachedImages, test_ds: CachedImages, tc: TrainConfig
) -> Measured:
    device = training_device(tc.device)
    val_logits, val_y, _ = predict_logits(net, val_ds, tc.batch_size, device)
    temperature = fit_temperature(val_logits, val_y) if len(val_y) else 1.0
    # Per-finding Platt scaling on validation, applied by the worker's code (worker.inference.calibration).
    by_temperature = Calibration.temperature(tc.labels, temperature)
    calibration = fit_platt(val_logits, val_y, tc.labels) if len(val_y) else by_temperature
    val_p = calibration.probabilities(val_logits)
    points, defaulted = choose_operating_points(val_y, val_p, tc.labels, tc.operating_point)
    test_logits, test_y, test_names = predict_logits(net, test_ds, tc.batch_size, device)
    test_p = calibration.probabilities(test_logits)
    metrics = compute_metrics(test_y, test_p, tc.labels, points)
    metrics.update(
        split="test", operating_point_method=tc.operating_point, calibration_method=calibration.method
    )
    metrics["ece_before_calibration"] = compute_metrics(
        test_y, by_temperature.probabilities(test_logits), tc.labels
    )["ece"]
    calibration = replace(calibration, calibrated=_calibration_holds(metrics, calibration))
    if defaulted:
        metrics["notes"].append(
            f"operating point 0.5 (validation had one class only): {', '.join(defaulted)}"
        )
    val_metrics = compute_metrics(val_y, val_p, tc.labels, points)
    metrics["validation"] = {k: val_metrics[k] for k in ("mean_auroc", "auroc", "ece", "n_images")}
    metrics["validation"]["ece_before_temperature"] = compute_metrics(val_y, sigmoid(val_logits), tc.labels)[
        "ece"
    ]
    if tc.reference_predictions is not None:
        metrics["reference_comparison"] = reference_comparison(
            test_names, test_y, test_p, tc.labels, tc.reference_predictions
        )
    return Measured(temperature, calibration, points, metrics, test_names, test_y, test_p, len(val_y))


def _selected_by(history: list[dict[str, Any]]) -> str:
    # fit() falls back to validation loss when no label has both classes in validation.
    return (
        "validation mean AUROC"
        if any(h["val_mean_auroc"] is not None for h in history)
        else "validation loss"
    )


def _training_data(
    tc: TrainConfig, summary: dict[str, Any], result: TrainResult, skipped: dict[str, Any], world: int
) -> dict[str, Any]:
    """The metadata's ``training_data``: counts, hashes and positives per split, skips, history, settings."""
    return {
        **summary["train"],
        "splits": {
            name: {k: s[k] for k in ("images", "patients", "sha256", "positives")}
            for name, s in summary.items()
        },
        "split_unit": "patient",
        "processes": world,
        "skipped": skipped,
        **({"dicom_folders": tc.input_report} if tc.input_report else {}),
        "seed": tc.seed,
        "history": result.history,
        "best_epoch": result.best_epoch,
        "selected_by": result.extra["selected_by"],
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(tc).items()
            if k not in {"notes", "input_report"}
        },
    }


def _write_docs(out_dir: Path, splits: Splits, tc: TrainConfig, measured: Measured) -> None:
    """metrics.json, configs/train.json, ROC/PR curves, splits.csv and the test predictions."""
    docs = out_dir / "docs"
    (docs / "metrics.json").write_text(json.dumps(measured.metrics, indent=2) + "\n")
    # The settings that made this bundle (MONAI bundle convention): `train --config` reruns them.
    (out_dir / "configs" / "train.json").write_text(json.dumps(train_settings(tc), indent=2) + "\n")
    write_curves(measured.test_y, measured.test_p, tc.labels, docs)
    # Which patient/image was used for what: fine-tuning, calibration and evaluation check against it.
    write_split_file(out_dir, splits)
    with (docs / "test_predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", *(f"prob_{lb}" for lb in tc.labels)])
        for name, row in zip(measured.test_names, measured.test_p, strict=True):
            writer.writerow([name, *(f"{v:.6f}" for v in row)])
    if measured.test_names:
        # The gateway's drift page compares its weekly scores with these held-out ones.
        write_reference_distribution(out_dir)


def _export(
    out_dir: Path,
    net: torch.nn.Module,
    cfg: dict[str, Any],
    tc: TrainConfig,
    m: Measured,
    card: str,
    data: dict[str, Any],
) -> None:
    export_bundle(
        out_dir,
        net.cpu(),
        cfg,
        name=tc.name,
        version=tc.version,
        labels=tc.labels,
        operating_points=m.points,
        temperature=m.temperature,
        calibration={
            **m.calibration.as_metadata(),
            "fitted_on": {"split": "val", "images": m.n_val},
            "ece_test_before": m.metrics["ece_before_calibration"],
            "ece_test_after": m.metrics["ece"],
        },
        metrics=m.metrics,
        training_data=data,
        model_card=card,
        fp16=tc.fp16_export,
    )


def train_and_export(splits: Splits, tc: TrainConfig, out_dir: Path) -> TrainResult:
    """Train on ``splits``, calibrate on validation, measure on test, write the bundle to ``out_dir``."""
    check_no_leakage(splits)
    if not splits.train:
        raise ValueError("the training split is empty")
    if tc.init_from is not None:
        check_finetune_leakage(tc.init_from, splits)
    net, cfg, shared = _network(tc)
    if tc.checkpoint_dir is None:
        tc.checkpoint_dir = out_dir.parent / f"{out_dir.name}.checkpoints"
    # Unreadable or non-image files are dropped here (counted per reason), before anything is measured.
    splits, cache_report = cache_splits(splits, cfg, tc)
    best_state, best_epoch, history, val_ds, test_ds = fit(net, splits, cfg, tc)
    rank, world = init_distributed(training_device(tc.device).type)
    if rank != 0:  # DDP: the other processes are done; rank 0 calibrates, measures and exports
        return TrainResult(
            out_dir, history, best_epoch, 1.0, {}, {}, [], np.zeros((0, len(tc.labels)), np.float32)
        )
    if len(history) < tc.epochs:
        raise TrainingStopped(
            f"stopped after epoch {len(history)} of {tc.epochs}; checkpoint in {tc.checkpoint_dir} "
            "(run again with --resume to continue)"
        )
    if tc.fp16_export:
        # Measure the weights that ship: the bundle stores fp16, so round before calibrating/evaluating.
        best_state = {k: v.half().float() if v.is_floating_point() else v for k, v in best_state.items()}
    net.load_state_dict(best_state)
    net.to(training_device(tc.device))
    m = calibrate_and_measure(net, val_ds, test_ds, tc)
    result = TrainResult(
        out_dir,
        history,
        best_epoch,
        m.temperature,
        m.points,
        m.metrics,
        m.test_names,
        m.test_p,
        extra={
            "shared_labels": shared,
            "calibrated": m.calibration.calibrated,
            "selected_by": _selected_by(history),
        },
    )
    summary = {name: data_summary(recs, tc.labels) for name, recs in splits.items()}
    skipped = {"counts": cache_report.skipped, "examples": cache_report.skipped_examples}
    card = model_card(tc, result, summary)
    _export(out_dir, net, cfg, tc, m, card, _training_data(tc, summary, result, skipped, world))
    _write_docs(out_dir, splits, tc, m)
    if tc.int8_export:
        _export_int8(out_dir, splits, tc)
    log.info("bundle written to %s: test mean AUROC %s", out_dir, fmt(m.metrics["mean_auroc"]))
    return result


def _export_int8(out_dir: Path, splits: Splits, tc: TrainConfig) -> None:
    """The CPU worker's int8 graph, calibrated on training images and checked on validation; a bundle
    whose int8 graph disagrees ships without one (the worker then runs fp32)."""
    from monai_train.quantize import quantize_records
    from worker.inference.quantize import QuantizationRejected

    try:
        report = quantize_records(out_dir, splits.train, splits.val, seed=tc.seed)
    except (QuantizationRejected, ValueError) as exc:  # ValueError: no validation image to check on
        log.warning("no int8 graph: %s", exc)
        return
    log.info(
        "int8 graph written: largest probability change %.4f on %d validation images",
        report["max_abs_probability_change"],
        report["check_images"],
    )
