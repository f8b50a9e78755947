"""`evaluate` cannot flatter: training patients refused, bootstrap intervals, groups, localisation."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from monai_train.__main__ import main
from monai_train.config import TrainResult
from monai_train.data import Splits
from monai_train.evaluate import Box, EvaluationError, evaluate, read_boxes, score_boxes
from monai_train.metrics import bootstrap_auroc, rank_auroc

REPO = Path(__file__).resolve().parents[3]


def _labels_for(small_set: Path, names: set[str], path: Path) -> Path:
    with (small_set / "labels.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    path.write_text("\n".join(",".join(r) for r in [rows[0]] + [r for r in rows[1:] if r[0] in names]) + "\n")
    return path


def test_rank_auroc_is_sklearns_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = (rng.random((200, 3)) < 0.2).astype(float)
    p = np.round(rng.random((200, 3)) + 0.3 * y, 1)  # many ties
    for i in range(3):
        assert rank_auroc(y[:, i], p[:, i])[0] == pytest.approx(roc_auc_score(y[:, i], p[:, i]))
    y[:, 2] = 0
    assert np.isnan(rank_auroc(y, p)[2])


def test_bootstrap_intervals_cover_the_estimate_and_patients_move_together() -> None:
    rng = np.random.default_rng(1)
    y = (rng.random((300, 2)) < 0.3).astype(float)
    p = rng.random((300, 2)) + 0.5 * y
    ci = bootstrap_auroc(y, p, ("A", "B"), samples=300)
    full = rank_auroc(y, p)
    for i, lb in enumerate(("A", "B")):
        lo, hi = ci["auroc_ci95"][lb]
        assert lo < full[i] < hi and hi - lo < 0.2
    # The same 30 images copied ten times: resampling images would give a narrow interval, patients not.
    yy, pp = np.tile(y[:30], (10, 1)), np.tile(p[:30], (10, 1))
    patients = [str(i % 30) for i in range(300)]
    by_image = bootstrap_auroc(yy, pp, ("A", "B"), samples=300)["mean_auroc_ci95"]
    by_patient = bootstrap_auroc(yy, pp, ("A", "B"), patients, samples=300)
    assert by_patient["bootstrap"]["unit"] == "patient" and by_patient["bootstrap"]["units"] == 30
    lo, hi = by_patient["mean_auroc_ci95"]
    assert hi - lo > 2 * (by_image[1] - by_image[0])


def test_nih_boxes_are_read_with_synonyms(tmp_path: Path) -> None:
    path = tmp_path / "boxes.csv"
    path.write_text(
        "Image Index,Finding Label,Bbox [x,y,w,h],,,\n"
        "a.png,Infiltrate,10,20,30,40\nb.png,Nodule,1,2,3,4\nc.png,Unknown,1,1,1,1\n"
    )
    boxes = read_boxes(path, ("Infiltration", "Nodule"))
    assert boxes == [Box("a.png", "Infiltration", 10, 20, 30, 40), Box("b.png", "Nodule", 1, 2, 3, 4)]


def test_pointing_game_and_box_hit_rate_on_known_maps() -> None:
    cam = np.zeros((2, 16, 16), np.float32)
    cam[0, 2:4, 12:14] = 1.0  # finding A: top right
    cam[1, 12:14, 2:4] = 1.0  # finding B: bottom left
    cams = {"x.png": cam}
    sizes = {"x.png": (512, 512)}  # rows, columns; boxes in a 1024 square are halved
    hit = Box("x.png", "A", 12 / 16 * 1024, 2 / 16 * 1024, 128, 128)
    miss = Box("x.png", "B", 0, 0, 200, 200)
    out = score_boxes([hit, miss, Box("other.png", "A", 0, 0, 1, 1)], cams, sizes, ("A", "B"))
    assert out["boxes"] == 2 and out["pointing_game"] == 0.5 and out["box_hit_rate"] == 0.5
    assert out["per_finding"]["A"] == {"boxes": 1, "pointing_hits": 1, "box_hits": 1}
    assert 0 < out["chance_pointing"] < 0.05


def test_training_patients_are_refused_and_only_measured_apart(
    trained: TrainResult, tiny_splits: Splits, small_set: Path, tmp_path: Path
) -> None:
    test_names = {r.name for r in tiny_splits.test}
    train_names = {r.name for r in tiny_splits.train}
    labels = _labels_for(small_set, test_names | train_names, tmp_path / "labels.csv")
    m = evaluate(
        small_set / "images", labels, tmp_path / "m.json", bundle_dir=trained.bundle, bootstrap_samples=50
    )
    assert m["n_images"] == len(test_names) and m["refused"]["images"] == len(train_names)
    assert not m["refused"]["measured_separately"] and "overlap" not in m
    assert m["mean_auroc"] == pytest.approx(trained.metrics["mean_auroc"], abs=1e-3)
    assert m["mean_auroc_ci95"] is None or m["mean_auroc_ci95"][0] <= m["mean_auroc_ci95"][1]
    assert set(m["by_resolution"]) == {"64x64"} and m["by_resolution"]["64x64"]["n_images"] == len(test_names)
    assert set(m["by_source"]) == {"nih-cxr14-64px"}

    both = evaluate(
        small_set / "images",
        labels,
        tmp_path / "b.json",
        bundle_dir=trained.bundle,
        allow_overlap=True,
        bootstrap_samples=50,
    )
    assert both["n_images"] == len(test_names) and both["mean_auroc"] == m["mean_auroc"]
    assert both["overlap"]["n_images"] == len(train_names) and "NOT" in both["overlap"]["warning"]
    with (tmp_path / "b_overlap_predictions.csv").open(newline="") as fh:
        assert {r["Image Index"] for r in csv.DictReader(fh)} == train_names

    only_train = _labels_for(small_set, train_names, tmp_path / "train.csv")
    with pytest.raises(EvaluationError, match="allow-overlap"):
        evaluate(small_set / "images", only_train, tmp_path / "t.json", bundle_dir=trained.bundle)


def test_cli_evaluate_with_boxes_writes_the_json(
    trained: TrainResult, tiny_splits: Splits, small_set: Path, tmp_path: Path
) -> None:
    names = {r.name for r in tiny_splits.test}
    labels = _labels_for(small_set, names, tmp_path / "labels.csv")
    first = sorted(names)[0]
    (tmp_path / "boxes.csv").write_text(
        f"Image Index,Finding Label,Bbox [x,y,w,h],,,\n{first},Effusion,0,0,1024,1024\n"
    )
    out = tmp_path / "e" / "metrics.json"
    main(
        [
            "evaluate",
            "--images",
            str(small_set / "images"),
            "--labels",
            str(labels),
            "--bundle",
            str(trained.bundle),
            "--out",
            str(out),
            "--boxes",
            str(tmp_path / "boxes.csv"),
            "--bootstrap",
            "50",
            "--threads",
            "1",
            "--cam-method",
            "gradcam++",
        ]
    )
    m = json.loads(out.read_text())
    loc = m["localisation"]
    # A whole-image box: hit by any region (the 32 px test bundle's 1 x 1 map may be empty: no region).
    assert loc["boxes"] == 1 and loc["pointing_game"] == loc["box_hit_rate"] in (0.0, 1.0)
    assert m["cam_method"] == "gradcam++" and loc["mean_region_area"] in (None, 1.0)
    assert m["bootstrap"]["samples"] == 50 and m["overlap_check"] == "docs/splits.csv"
    assert set(m["auroc_ci95"]) == set(m["auroc"])


def test_cxr_gateway_evaluate_is_a_top_level_command() -> None:
    # The service package dispatches to monai_train in a new program (it never imports torch itself).
    done = subprocess.run(
        [sys.executable, "-c", "from service.cli import main; main()", "evaluate", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "--allow-overlap" in done.stdout and "--boxes" in done.stdout


def test_paired_difference_of_two_models_on_the_same_patients() -> None:
    from monai_train.metrics import paired_bootstrap_difference

    rng = np.random.default_rng(2)
    y = (rng.random((200, 2)) < 0.3).astype(float)
    good, noise = y + 0.8 * rng.random((200, 2)), rng.random((200, 2))
    d = paired_bootstrap_difference(
        y, good, noise, ("A", "B"), [str(i // 2) for i in range(200)], samples=200
    )
    assert d["mean_auroc_difference"] > 0.3 and d["difference_ci95"][0] > 0.2
    assert d["share_of_resamples_above_zero"] == 1.0
    same = paired_bootstrap_difference(y, noise, noise, ("A", "B"), samples=50)
    assert same["mean_auroc_difference"] == 0.0 and same["difference_ci95"] == [0.0, 0.0]


def test_versus_measures_both_bundles_on_images_neither_learned_from(
    trained: TrainResult, tiny_splits: Splits, small_set: Path, tmp_path: Path
) -> None:
    names = {r.name for r in tiny_splits.test} | {r.name for r in tiny_splits.train}
    labels = _labels_for(small_set, names, tmp_path / "labels.csv")
    m = evaluate(
        small_set / "images",
        labels,
        tmp_path / "v.json",
        bundle_dir=trained.bundle,
        versus=trained.bundle,
        bootstrap_samples=30,
    )
    assert m["n_images"] == len(tiny_splits.test) and m["versus"]["mean_auroc_difference"] == 0.0
    assert "64x64" in m["versus"]["by_resolution"]
