"""The model card a trained bundle carries (``docs/README.md``): what it is, how it was trained, and what it
measured on its held-out test split."""

from __future__ import annotations

from typing import Any

from monai_train.cache import Augmentation
from monai_train.config import TrainConfig, TrainResult


def fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def model_card(tc: TrainConfig, result: TrainResult, summary: dict[str, Any]) -> str:
    lines = [
        *_description(tc, result, summary),
        *_test_results(tc, result.metrics, bool(result.extra.get("calibrated"))),
    ]
    lines += ["## Notes", "", tc.notes.strip() or "(none)", ""]
    return "\n".join(lines)


def _description(tc: TrainConfig, result: TrainResult, summary: dict[str, Any]) -> list[str]:
    init = f"fine-tuned from {tc.init_from}" if tc.init_from else "random (trained from scratch)"
    aug = Augmentation().describe() if tc.augment else "none"
    tr, va, te = summary["train"], summary["val"], summary["test"]
    return [
        f"# {tc.name} {tc.version} — demonstration model",
        "",
        "**Not for clinical use.** A demonstration of the training pipeline, not a medical device: its "
        "accuracy is far below a model trained on the full ChestX-ray14 set.",
        "",
        f"- Architecture: MONAI `DenseNet121`, 2-D, 1 channel, {len(tc.labels)} sigmoid outputs "
        f"({', '.join(tc.labels)}); feature stride {tc.feature_stride} "
        f"({max(1, tc.image_size // tc.feature_stride)} × {max(1, tc.image_size // tc.feature_stride)} "
        "heatmap cells"
        + ("" if tc.feature_stride == 32 else ", last transitions without pooling: `DenseNet121Fine`")
        + ").",
        f"- Initialisation: {init}.",
        f"- Training data: {tr['images']} images of {tr['patients']} patients (validation {va['images']} / "
        f"{va['patients']}, held-out test {te['images']} / {te['patients']}), split by patient with seed "
        f"{tc.seed}; training images per source {tr['sources']}.",
        f"- Input: {'histogram equalisation, then ' if tc.histogram_equalise else ''}resize to "
        f"{tc.image_size} × {tc.image_size} (area), {'CLAHE (8 × 8 tiles, clip 2), ' if tc.clahe else ''}"
        "(x − 0.5) / 0.25 on display values in "
        "[0, 1] — `configs/inference.json`, the same definition the worker runs.",
        f"- Training: {tc.epochs} epochs, batch {tc.batch_size}, AdamW (weight decay {tc.weight_decay}), "
        f"one-cycle LR peak {tc.lr}, loss {tc.loss} with pos_weight = neg/pos clipped to "
        f"[1, {tc.pos_weight_max}], augmentation: {aug}"
        + (
            f"; {tc.low_res_prob:g} of training images pooled to {tc.low_res} px and back"
            if tc.low_res
            else ""
        )
        + (
            f"; distillation: + {tc.distill_weight:g} × BCE towards the reference probabilities "
            f"({tc.reference_predictions}) on the training images they cover"
            if tc.distill_weight > 0
            else ""
        )
        + ".",
        f"- Best epoch {result.best_epoch} by {result.extra['selected_by']}; temperature "
        f"{result.temperature:.3f} fitted on validation logits (NLL), then per-finding Platt scaling "
        "(scale + bias per finding, `calibration` in `configs/metadata.json`) fitted on the same validation "
        f"logits; operating points maximise {tc.operating_point.upper()} on calibrated validation "
        "probabilities.",
        "",
    ]


def _test_results(tc: TrainConfig, m: dict[str, Any], calibrated: bool) -> list[str]:
    ref = m.get("reference_comparison")
    lines = [
        f"## Measured on its own held-out test split ({m['n_images']} images)",
        "",
        f"Mean AUROC {fmt(m['mean_auroc'])} over {m['mean_auroc_labels']} findings; micro-F1 "
        f"{fmt(m['micro_f1'])}, macro-F1 {fmt(m['macro_f1'])}, Hamming loss {fmt(m['hamming_loss'])}, "
        f"ECE {fmt(m['ece'])} after calibration, {fmt(m.get('ece_before_calibration'))} with the "
        "temperature alone; the SR and SC call the outputs probabilities only when calibration lowers "
        f"the test ECE ({'it did' if calibrated else 'it did not'}).",
        "",
    ]
    header = "| finding | test positives | AUROC | AP | F1 |"
    if ref:
        header += (
            f" AUROC on the {ref['n_images']} dev-set test images | reference CheXNet AUROC, same images |"
        )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for lb in tc.labels:
        row = (
            f"| {lb} | {m['positives'][lb]} | {fmt(m['auroc'][lb])} | {fmt(m['average_precision'][lb])} "
            f"| {fmt(m['f1'][lb])} |"
        )
        if ref:
            row += f" {fmt(ref['model']['auroc'][lb])} | {fmt(ref['reference']['auroc'][lb])} |"
        lines.append(row)
    if ref:
        lines += [
            "",
            f"On the {ref['n_images']} test images that the reference CheXNet reproduction also scored: "
            f"this model's mean AUROC {fmt(ref['model']['mean_auroc'])}, the reference's "
            f"{fmt(ref['reference']['mean_auroc'])}.",
        ]
    lines += [
        "",
        "AUROC is undefined (n/a) where the test split holds no positive; such findings are left out "
        "of the mean. With so few positives per finding the confidence intervals are wide (±0.1 and more).",
        "",
    ]
    return lines
