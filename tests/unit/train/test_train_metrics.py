from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from monai_train.metrics import (
    choose_operating_points,
    compute_metrics,
    expected_calibration_error,
    fit_temperature,
    write_curves,
)

LABELS = ("A", "B", "C")
Y = np.array([[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=float)
P = np.array(
    [[0.9, 0.2, 0.1], [0.3, 0.8, 0.2], [0.6, 0.4, 0.3], [0.2, 0.1, 0.4], [0.4, 0.7, 0.5], [0.5, 0.6, 0.6]]
)


def test_auroc_matches_sklearn_and_undefined_labels_are_excluded() -> None:
    m = compute_metrics(Y, P, LABELS)
    assert m["auroc"]["A"] == pytest.approx(roc_auc_score(Y[:, 0], P[:, 0]), abs=1e-6)
    assert m["auroc"]["B"] == pytest.approx(roc_auc_score(Y[:, 1], P[:, 1]), abs=1e-6)
    assert m["auroc"]["C"] is None  # no positive: undefined, written as null
    assert m["mean_auroc"] == pytest.approx((m["auroc"]["A"] + m["auroc"]["B"]) / 2, abs=1e-6)
    assert m["mean_auroc_labels"] == 2 and any("C" in n for n in m["notes"])
    for key in ("average_precision", "f1", "micro_f1", "macro_f1", "hamming_loss", "ece", "n_images"):
        assert key in m
    assert m["n_images"] == 6


def test_binarised_metrics_at_operating_points() -> None:
    m = compute_metrics(Y, P, LABELS, {"A": 0.55, "B": 0.55, "C": 0.55})
    # A: predicted {0, 2} = true {0, 2, 4} minus one → F1 = 2·2 / (2 + 3); B: predicted {1, 4, 5} vs {1, 2, 5}
    assert m["f1"]["A"] == pytest.approx(0.8) and m["f1"]["B"] == pytest.approx(2 / 3)
    assert m["hamming_loss"] == pytest.approx(4 / 18)  # A:1, B:2, C:1 wrong of 18 decisions


def test_ece_by_hand() -> None:
    assert expected_calibration_error([1, 0], [1.0, 0.0]) == pytest.approx(0.0)
    # Two in the 0.7 bin, one right: |0.7 − 0.5| = 0.2 for all samples.
    assert expected_calibration_error([1, 0], [0.7, 0.7]) == pytest.approx(0.2)


def test_temperature_recovers_a_known_scale() -> None:
    rng = np.random.default_rng(0)
    s = rng.normal(0, 2, 20000)
    y = (rng.random(s.size) < 1 / (1 + np.exp(-s))).astype(float)
    assert fit_temperature(3.0 * s, y) == pytest.approx(3.0, rel=0.05)  # overconfident by 3×


def test_operating_points() -> None:
    y = np.array([[0], [0], [1], [1]])
    p = np.array([[0.1], [0.3], [0.35], [0.9]])
    for method in ("f1", "youden"):
        points, defaulted = choose_operating_points(y, p, ("A",), method)
        assert points["A"] == pytest.approx(0.35) and not defaulted
    points, defaulted = choose_operating_points(np.zeros((4, 1)), p, ("A",))
    assert points == {"A": 0.5} and defaulted == ["A"]


def test_curves_are_pngs(tmp_path: Path) -> None:
    paths = write_curves(Y, P, LABELS, tmp_path, prefix="x_")
    assert [p.name for p in paths] == ["x_roc.png", "x_pr.png"]
    for p in paths:
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 500
