"""Per-finding calibration: fitted by monai_train on validation, applied by the worker's own code."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from monai_train.calibrate import fit_platt
from monai_train.config import TrainResult
from monai_train.data import load_image
from monai_train.metrics import expected_calibration_error
from worker.inference.bundle import BundleError, load_bundle
from worker.inference.calibration import Calibration, CalibrationError
from worker.inference.predictor import Predictor

SHIPPED = Path(__file__).resolve().parents[3] / "worker" / "bundles" / "cxr14_densenet121"


def _synthetic(n: int = 4000, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Logits whose true probability is sigmoid(a·z + b) per label, with known (a, b)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 2.0, (n, 2))
    a, b = np.array([0.5, 0.5]), np.array([-2.0, -3.0])
    y = (rng.random((n, 2)) < 1.0 / (1.0 + np.exp(-(a * z + b)))).astype(float)
    return z, y, np.stack([a, b])


def test_platt_recovers_a_known_shift_and_scale_and_lowers_ece() -> None:
    z, y, truth = _synthetic()
    cal = fit_platt(z, y, ("A", "B"))
    assert cal.method == "platt" and cal.calibrated
    np.testing.assert_allclose(cal.scale, truth[0], rtol=0.15)
    np.testing.assert_allclose(cal.bias, truth[1], atol=0.3)
    raw = expected_calibration_error(y, 1.0 / (1.0 + np.exp(-z)))
    assert expected_calibration_error(y, cal.probabilities(z)) < 0.03 < raw


def test_a_finding_with_one_positive_keeps_the_shared_scale() -> None:
    z, y, _ = _synthetic(n=300)
    y[:, 1] = 0.0
    y[0, 1] = 1.0
    cal = fit_platt(z, y, ("A", "B"))
    assert all(s > 0 for s in cal.scale)
    assert abs(np.log(cal.scale[1]) - np.log(cal.scale[0])) < 0.5  # shrunk, not fitted to one image


def test_metadata_round_trip_and_thresholds_keep_every_decision() -> None:
    z, y, _ = _synthetic(n=500)
    cal = fit_platt(z, y, ("A", "B"))
    again = Calibration.from_metadata({"calibration": cal.as_metadata()}, ("A", "B"))
    assert again == cal
    before = Calibration.temperature(("A", "B"), 1.3)
    for i, lb in enumerate(("A", "B")):
        t = 0.42
        t_new = before.equivalent_threshold(cal, lb, t)
        old = before.probabilities(z)[:, i] >= t
        new = cal.probabilities(z)[:, i] >= t_new
        assert (old != new).sum() <= 1  # float32 rounding at the threshold itself


def test_old_bundles_use_their_temperature_and_are_not_calibrated() -> None:
    cal = Calibration.from_metadata({"temperature": 2.0}, ("A",))
    assert cal.method == "temperature" and not cal.calibrated
    assert cal.probabilities(np.array([[2.0]]))[0, 0] == pytest.approx(1 / (1 + np.exp(-1.0)))
    with pytest.raises(CalibrationError):
        Calibration("platt", ("A",), (-1.0,), (0.0,), True)


def test_a_bundle_with_a_broken_calibration_is_refused(tmp_path: Path) -> None:
    broken = tmp_path / "b"
    shutil.copytree(SHIPPED, broken)
    meta = json.loads((broken / "configs/metadata.json").read_text())
    meta["calibration"]["per_label"].pop("Hernia")
    (broken / "configs/metadata.json").write_text(json.dumps(meta))
    with pytest.raises(BundleError):
        load_bundle(broken)


def test_training_writes_platt_calibration_the_worker_applies(trained: TrainResult) -> None:
    bundle = load_bundle(trained.bundle)
    assert bundle.calibration is not None and bundle.calibration.method == "platt"
    m = bundle.metadata["metrics"]
    assert "ece_before_calibration" in m and m["calibration_method"] == "platt"
    # Called probabilities only where calibration held on the test split.
    assert bundle.calibrated == (m["ece"] < m["ece_before_calibration"])


def test_shipped_bundle_is_calibrated_and_the_worker_reproduces_its_test_predictions(
    shared_dir: Path,
) -> None:
    bundle = load_bundle(SHIPPED)
    assert bundle.calibrated and bundle.calibration is not None and bundle.calibration.method == "platt"
    meta = bundle.metadata
    assert meta["metrics"]["ece"] < meta["metrics"]["ece_before_calibration"]  # it held on the test split
    with (SHIPPED / "docs/test_predictions.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    folders = [
        shared_dir / "data" / "nih-cxr14-dev" / "images",
        shared_dir / "data" / "nih-cxr14-64px" / "images",
    ]
    picked = [r for r in rows[::27]][:8]
    paths = [next(f / r["Image Index"] for f in folders if (f / r["Image Index"]).is_file()) for r in picked]
    images = [load_image(p) for p in paths]
    expected = np.asarray([[float(r[f"prob_{lb}"]) for lb in bundle.labels] for r in picked])
    # The card's figures are the fp32 graph's; the worker runs the checked int8 graph on a CPU (its
    # largest change on the validation images is recorded in metadata: 0.006).
    fp32 = Predictor(bundle, threads=1, precision="fp32")
    np.testing.assert_allclose(fp32.predict(images).probabilities, expected, atol=2e-6)
    worker = Predictor(bundle, threads=1)
    assert worker.precision == "int8" and meta["int8"]["max_abs_probability_change"] < 0.02
    np.testing.assert_allclose(worker.predict(images).probabilities, expected, atol=0.02)


def test_recalibrating_a_bundle_writes_platt_and_voids_its_int8_graph(
    trained: TrainResult, small_set: Path, tmp_path: Path
) -> None:
    """`monai_train calibrate --write` on a temperature-only bundle: Platt per finding from its own
    validation split, operating points re-expressed, and the int8 graph (checked against the old
    probabilities) removed so the worker does not run an unchecked one."""
    from monai_train.calibrate import recalibrate_bundle

    bundle_dir = tmp_path / "bundle"
    shutil.copytree(trained.bundle, bundle_dir)
    meta_path = bundle_dir / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta.pop("calibration")  # back to the temperature alone
    meta_path.write_text(json.dumps(meta))
    assert (bundle_dir / "models/model.int8.onnx").is_file() and "int8" in meta
    report = recalibrate_bundle(
        bundle_dir, [small_set / "images"], [small_set / "labels.csv"], write=True, threads=1
    )
    assert report["fitted_on"]["split"] == "val" and report["measured_on"]["split"] == "test"
    after = load_bundle(bundle_dir)
    assert report["holds_on_test"]  # seeded: the test ECE falls here, so it is written
    assert report["written"] and report["int8_removed"]
    assert after.calibration is not None and after.calibration.method == "platt"
    assert not (bundle_dir / "models/model.int8.onnx").exists() and "int8" not in after.metadata
    assert Predictor(after).precision == "fp32"
