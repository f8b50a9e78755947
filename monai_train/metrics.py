"""Multi-label metrics, operating points, temperature scaling and ROC/PR curve images.

matplotlib is not a dependency of this project, so curves are drawn with Pillow (always available);
the output is identical on every machine.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont
from scipy.optimize import minimize_scalar
from sklearn.metrics import (
    average_precision_score,
    f1_score,
    hamming_loss,
    precision_recall_curve,
    roc_auc_score,
    roc_curve,
)

Array = npt.NDArray[np.floating[Any]]
OPERATING_POINT_METHODS = ("f1", "youden")
ECE_BINS = 10


def _as_2d(y: npt.ArrayLike, p: npt.ArrayLike, labels: Sequence[str]) -> tuple[Array, Array]:
    yy = np.asarray(y, dtype=np.float64).reshape(-1, len(labels))
    pp = np.asarray(p, dtype=np.float64).reshape(-1, len(labels))
    if yy.shape != pp.shape:
        raise ValueError(f"labels {yy.shape} and predictions {pp.shape} differ in shape")
    return yy, pp


def _both_classes(y: Array) -> bool:
    return bool(y.min(initial=1.0) == 0.0 and y.max(initial=0.0) == 1.0)


def _clean(v: float) -> float | None:
    """JSON has no NaN: undefined metrics are written as null."""
    return None if v is None or not math.isfinite(v) else round(float(v), 6)


def auroc_per_label(y: npt.ArrayLike, p: npt.ArrayLike, labels: Sequence[str]) -> dict[str, float]:
    """AUROC per label; NaN where y_true has only one class (AUROC is undefined there)."""
    yy, pp = _as_2d(y, p, labels)
    return {
        lb: float(roc_auc_score(yy[:, i], pp[:, i])) if _both_classes(yy[:, i]) else math.nan
        for i, lb in enumerate(labels)
    }


def mean_defined(values: Mapping[str, float]) -> float:
    defined = [v for v in values.values() if v is not None and math.isfinite(v)]
    return float(np.mean(defined)) if defined else math.nan


def expected_calibration_error(y: npt.ArrayLike, p: npt.ArrayLike, bins: int = ECE_BINS) -> float:
    """Binary ECE over every (image, label) output: equal-width bins on [0, 1], weighted by bin size."""
    yy = np.asarray(y, dtype=np.float64).ravel()
    pp = np.asarray(p, dtype=np.float64).ravel()
    if yy.size == 0:
        return math.nan
    idx = np.minimum((pp * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            ece += mask.mean() * abs(pp[mask].mean() - yy[mask].mean())
    return float(ece)


# ---------------------------------------------------------------------------------------------- fitting


def choose_operating_points(
    y: npt.ArrayLike, p: npt.ArrayLike, labels: Sequence[str], method: str = "f1"
) -> tuple[dict[str, float], list[str]]:
    """Per-label threshold on probabilities (predict positive when p >= t).

    ``f1`` maximises F1 (favours precision on rare findings); ``youden`` maximises sensitivity +
    specificity − 1 (prevalence-free). A label without both classes keeps 0.5, listed in the return.
    """
    if method not in OPERATING_POINT_METHODS:
        raise ValueError(f"operating point method must be one of {OPERATING_POINT_METHODS}")
    yy, pp = _as_2d(y, p, labels)
    points: dict[str, float] = {}
    defaulted: list[str] = []
    for i, lb in enumerate(labels):
        if not _both_classes(yy[:, i]):
            points[lb] = 0.5
            defaulted.append(lb)
            continue
        if method == "f1":
            precision, recall, thr = precision_recall_curve(yy[:, i], pp[:, i])
            f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
            points[lb] = float(thr[int(np.argmax(f1))])
        else:
            fpr, tpr, thr = roc_curve(yy[:, i], pp[:, i])
            finite = np.isfinite(thr)
            j = np.where(finite, tpr - fpr, -np.inf)
            points[lb] = float(min(thr[int(np.argmax(j))], 1.0))
    return points, defaulted


def fit_temperature(logits: npt.ArrayLike, y: npt.ArrayLike) -> float:
    """One temperature T for all labels minimising the mean NLL of sigmoid(logits / T) (Guo et al. 2017)."""
    z = np.asarray(logits, dtype=np.float64).ravel()
    t = np.asarray(y, dtype=np.float64).ravel()
    if z.size == 0:
        return 1.0

    def nll(log_t: float) -> float:
        s = z / math.exp(log_t)
        # softplus(s) - t·s is the stable form of −[t log σ(s) + (1 − t) log(1 − σ(s))].
        return float(np.mean(np.logaddexp(0.0, s) - t * s))

    res = minimize_scalar(
        nll, bounds=(math.log(0.05), math.log(20.0)), method="bounded", options={"xatol": 1e-5}
    )
    best = float(math.exp(res.x))
    # The bounded search can stop near a bound on degenerate data; never do worse than T = 1.
    return best if nll(res.x) <= nll(0.0) else 1.0


# ---------------------------------------------------------------------------------------------- report


def compute_metrics(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    labels: Sequence[str],
    operating_points: Mapping[str, float] | None = None,
) -> dict[str, Any]:
    """The metrics.json dictionary for probabilities ``p`` (n, L) against multi-hot ``y`` (n, L)."""
    yy, pp = _as_2d(y, p, labels)
    points = {lb: float((operating_points or {}).get(lb, 0.5)) for lb in labels}
    thr = np.asarray([points[lb] for lb in labels])
    pred = (pp >= thr).astype(int)
    yi = yy.astype(int)
    auroc = auroc_per_label(yy, pp, labels)
    defined = [lb for lb in labels if math.isfinite(auroc[lb])]
    undefined = [lb for lb in labels if lb not in defined]
    ap = {
        lb: float(average_precision_score(yy[:, i], pp[:, i])) if yy[:, i].max(initial=0) == 1 else math.nan
        for i, lb in enumerate(labels)
    }
    f1 = {
        lb: float(f1_score(yi[:, i], pred[:, i], zero_division=0))
        if yy[:, i].max(initial=0) == 1
        else math.nan
        for i, lb in enumerate(labels)
    }
    with_pos = [i for i in range(len(labels)) if yy[:, i].max(initial=0) == 1]
    out: dict[str, Any] = {
        "auroc": {lb: _clean(v) for lb, v in auroc.items()},
        "mean_auroc": _clean(mean_defined(auroc)),
        "average_precision": {lb: _clean(v) for lb, v in ap.items()},
        "mean_average_precision": _clean(mean_defined(ap)),
        "f1": {lb: _clean(v) for lb, v in f1.items()},
        "micro_f1": _clean(float(f1_score(yi, pred, average="micro", zero_division=0))) if yy.size else None,
        "macro_f1": _clean(float(np.mean([f1[labels[i]] for i in with_pos]))) if with_pos else None,
        "hamming_loss": _clean(float(hamming_loss(yi, pred))) if yy.size else None,
        "ece": _clean(expected_calibration_error(yy, pp)),
        "n_images": int(yy.shape[0]),
        "positives": {lb: int(yy[:, i].sum()) for i, lb in enumerate(labels)},
        "operating_points": {lb: round(v, 6) for lb, v in points.items()},
        "notes": [
            "F1, micro/macro-F1 and Hamming loss binarise at the per-label operating points (p >= t).",
            f"ECE: {ECE_BINS} equal-width bins over every (image, label) probability.",
        ],
    }
    if undefined:
        out["notes"].append(
            f"AUROC undefined (one class only in y_true) for {', '.join(undefined)}: "
            f"mean_auroc is over the other {len(defined)} labels; macro_f1 over labels with positives."
        )
    out["mean_auroc_labels"] = len(defined)
    return out


# ---------------------------------------------------------------------------------------------- curves

_PALETTE = (
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
    (0, 0, 128),
    (128, 0, 0),
    (0, 128, 128),
    (230, 190, 0),
)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one fixed-size bitmap font
        return ImageFont.load_default()


def _plot(
    curves: Sequence[tuple[str, Array, Array, float]],
    path: Path,
    *,
    title: str,
    xlabel: str,
    ylabel: str,
    diagonal: bool,
) -> Path:
    w, h = 1000, 720
    left, top, plot = 80, 50, 600
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(16), _font(13)

    def xy(x: float, y: float) -> tuple[float, float]:
        return left + x * plot, top + (1.0 - y) * plot

    for k in range(6):
        v = k / 5
        gx, gy = xy(v, v)
        draw.line([xy(v, 0), xy(v, 1)], fill=(230, 230, 230))
        draw.line([xy(0, v), xy(1, v)], fill=(230, 230, 230))
        draw.text((gx - 10, top + plot + 6), f"{v:.1f}", fill="black", font=small)
        draw.text((left - 34, gy - 7), f"{v:.1f}", fill="black", font=small)
    draw.rectangle([xy(0, 1), xy(1, 0)], outline="black")
    if diagonal:
        draw.line([xy(0, 0), xy(1, 1)], fill=(170, 170, 170), width=1)
    draw.text((left + 140, 10), title, fill="black", font=font)
    draw.text((left + plot / 2 - 60, top + plot + 28), xlabel, fill="black", font=font)
    draw.text((8, top - 24), ylabel, fill="black", font=font)
    for i, (name, xs, ys, score) in enumerate(curves):
        colour = _PALETTE[i % len(_PALETTE)]
        pts = [xy(float(a), float(b)) for a, b in zip(xs, ys, strict=True)]
        if len(pts) >= 2:
            draw.line(pts, fill=colour, width=2)
        ly = top + 8 + i * 22
        draw.line([(left + plot + 20, ly + 8), (left + plot + 45, ly + 8)], fill=colour, width=3)
        draw.text((left + plot + 52, ly), f"{name} ({score:.3f})", fill="black", font=small)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path


def write_curves(
    y: npt.ArrayLike, p: npt.ArrayLike, labels: Sequence[str], out_dir: Path, prefix: str = ""
) -> list[Path]:
    """``roc.png`` and ``pr.png`` (one curve per label with both classes) in ``out_dir``."""
    yy, pp = _as_2d(y, p, labels)
    roc: list[tuple[str, Array, Array, float]] = []
    pr: list[tuple[str, Array, Array, float]] = []
    for i, lb in enumerate(labels):
        if not _both_classes(yy[:, i]):
            continue
        fpr, tpr, _ = roc_curve(yy[:, i], pp[:, i])
        roc.append((lb, fpr, tpr, float(roc_auc_score(yy[:, i], pp[:, i]))))
        precision, recall, _ = precision_recall_curve(yy[:, i], pp[:, i])
        pr.append((lb, recall, precision, float(average_precision_score(yy[:, i], pp[:, i]))))
    n = yy.shape[0]
    return [
        _plot(
            roc,
            out_dir / f"{prefix}roc.png",
            title=f"ROC, {n} images (legend: AUROC)",
            xlabel="1 - specificity",
            ylabel="sensitivity",
            diagonal=True,
        ),
        _plot(
            pr,
            out_dir / f"{prefix}pr.png",
            title=f"Precision-recall, {n} images (legend: AP)",
            xlabel="recall",
            ylabel="precision",
            diagonal=False,
        ),
    ]


# ---------------------------------------------------------------------------------------------- intervals

BOOTSTRAP_SAMPLES = 1000


def rank_auroc(y: npt.ArrayLike, p: npt.ArrayLike) -> Array:
    """AUROC per column by the rank-sum (Mann–Whitney) formula, ties averaged: sklearn's value, vectorised.

    NaN where a column lacks one of the two classes.
    """
    from scipy.stats import rankdata

    yy = np.asarray(y, dtype=np.float64)
    pp = np.asarray(p, dtype=np.float64)
    if yy.ndim == 1:
        yy, pp = yy[:, None], pp[:, None]
    ranks = rankdata(pp, axis=0)
    n_pos = yy.sum(axis=0)
    n_neg = yy.shape[0] - n_pos
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = ((ranks * yy).sum(axis=0) - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)
    return np.where((n_pos > 0) & (n_neg > 0), auc, np.nan)


def bootstrap_auroc(
    y: npt.ArrayLike,
    p: npt.ArrayLike,
    labels: Sequence[str],
    clusters: Sequence[str] | None = None,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Percentile bootstrap intervals for each label's AUROC and for the mean AUROC.

    Resampling unit: ``clusters`` (patients) when given, so several images of one patient move together
    and cannot narrow the interval; images otherwise. The mean is taken, in every resample, over the labels
    whose AUROC is defined on the whole set (a resample that draws no positive of a
    rare finding keeps, for the mean only, that finding's whole-set AUROC, so every resample averages the
    same findings and a dropped finding cannot shift the mean; how often that happened is reported).
    """
    yy, pp = _as_2d(y, p, labels)
    n = yy.shape[0]
    rng = np.random.default_rng(seed)
    if clusters is None:
        groups = [np.asarray([i]) for i in range(n)]
    else:
        by: dict[str, list[int]] = {}
        for i, c in enumerate(clusters):
            by.setdefault(str(c), []).append(i)
        groups = [np.asarray(v) for v in by.values()]
    full = rank_auroc(yy, pp) if n else np.full(len(labels), np.nan)
    headline = np.isfinite(full)
    per = np.full((samples, len(labels)), np.nan)
    means = np.full(samples, np.nan)
    incomplete = 0
    for s in range(samples):
        pick = rng.integers(0, len(groups), len(groups)) if groups else np.zeros(0, int)
        idx = np.concatenate([groups[g] for g in pick]) if len(pick) else np.zeros(0, int)
        auc = rank_auroc(yy[idx], pp[idx]) if len(idx) else np.full(len(labels), np.nan)
        per[s] = auc
        missing = headline & ~np.isfinite(auc)
        if missing.any():
            incomplete += 1
        if headline.any():
            means[s] = float(np.where(missing, full, auc)[headline].mean())
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2

    def interval(values: Array) -> list[float | None] | None:
        v = values[np.isfinite(values)]
        if v.size < max(10, samples // 10):
            return None
        return [_clean(float(np.quantile(v, lo_q))), _clean(float(np.quantile(v, hi_q)))]

    return {
        "auroc_ci95": {lb: interval(per[:, i]) if headline[i] else None for i, lb in enumerate(labels)},
        "mean_auroc_ci95": interval(means),
        "bootstrap": {
            "samples": samples,
            "seed": seed,
            "unit": "patient" if clusters is not None else "image",
            "units": len(groups),
            "level": level,
            "method": "percentile",
            "resamples_missing_a_finding": incomplete,
        },
    }


def paired_bootstrap_difference(
    y: npt.ArrayLike,
    p_a: npt.ArrayLike,
    p_b: npt.ArrayLike,
    labels: Sequence[str],
    clusters: Sequence[str] | None = None,
    *,
    samples: int = BOOTSTRAP_SAMPLES,
    seed: int = 0,
    level: float = 0.95,
) -> dict[str, Any]:
    """Mean AUROC of ``p_a`` minus that of ``p_b`` on the same images, with a paired bootstrap interval
    (the same resampled patients for both, so the interval is of the difference, not of two figures)."""
    yy, pa = _as_2d(y, p_a, labels)
    _, pb = _as_2d(y, p_b, labels)
    rng = np.random.default_rng(seed)
    n = yy.shape[0]
    by: dict[str, list[int]] = {}
    for i, c in enumerate(clusters if clusters is not None else [str(i) for i in range(n)]):
        by.setdefault(str(c), []).append(i)
    groups = [np.asarray(v) for v in by.values()]
    full_a, full_b = rank_auroc(yy, pa), rank_auroc(yy, pb)
    headline = np.isfinite(full_a) & np.isfinite(full_b)
    point = float(full_a[headline].mean() - full_b[headline].mean()) if headline.any() else math.nan
    diffs = np.full(samples, np.nan)
    for s in range(samples):
        idx = np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
        a, b = rank_auroc(yy[idx], pa[idx]), rank_auroc(yy[idx], pb[idx])
        a = np.where(np.isfinite(a), a, full_a)
        b = np.where(np.isfinite(b), b, full_b)
        diffs[s] = float(a[headline].mean() - b[headline].mean()) if headline.any() else np.nan
    v = diffs[np.isfinite(diffs)]
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    return {
        "mean_auroc_difference": _clean(point),
        "difference_ci95": [_clean(float(np.quantile(v, lo_q))), _clean(float(np.quantile(v, hi_q)))]
        if v.size
        else None,
        "share_of_resamples_above_zero": round(float((v > 0).mean()), 4) if v.size else None,
        "labels": int(headline.sum()),
    }
