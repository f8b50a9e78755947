"""The int8 CPU graph: written by `monai_train quantize` from a bundle's own splits, checked against the
fp32 graph, picked by the worker's Predictor when present, and never written when it disagrees."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from monai_train.__main__ import init_bundle
from monai_train.__main__ import main as train_main
from monai_train.data import load_image
from service.site.bundles import bundle_sha256
from worker.inference.bundle import INT8_WEIGHTS, load_bundle
from worker.inference.predictor import Predictor
from worker.inference.quantize import QuantizationRejected, agreement, quantize_bundle


@pytest.fixture(scope="module")
def fp32_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundle")
    init_bundle(out, seed=4)
    return out


@pytest.fixture
def bundle_dir(fp32_bundle: Path, tmp_path: Path) -> Path:
    """A copy of the fp32 bundle that the test may change."""
    return Path(shutil.copytree(fp32_bundle, tmp_path / "bundle"))


def _dev(shared_dir: Path) -> tuple[Path, Path, list[str]]:
    folder = shared_dir / "data" / "nih-cxr14-dev"
    names = sorted(p.name for p in (folder / "images").glob("*.png"))
    return folder / "images", folder / "labels.csv", names


def test_quantize_command_writes_a_checked_int8_graph_that_the_worker_runs(
    bundle_dir: Path, shared_dir: Path, tmp_path: Path
) -> None:
    images, labels, names = _dev(shared_dir)
    with (bundle_dir / "docs" / "splits.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Patient ID", "split"])
        writer.writerows([name, str(i), "train"] for i, name in enumerate(names[:12]))
        writer.writerows([name, str(100 + i), "val"] for i, name in enumerate(names[12:18]))
        writer.writerows([name, str(200 + i), "test"] for i, name in enumerate(names[18:24]))
    before = load_bundle(bundle_dir)
    assert Predictor(before).precision == "fp32"  # no int8 graph yet

    report_path = tmp_path / "int8.json"
    flags = ["--calibration-images", "4", "--tolerance", "1", "--out", str(report_path), "--threads", "1"]
    data = ["--images", str(images), "--labels", str(labels)]
    train_main(["quantize", "--bundle", str(bundle_dir), *data, *flags])

    report = json.loads(report_path.read_text())
    assert (bundle_dir / INT8_WEIGHTS).is_file()
    assert report["calibration_images"] == 4 and report["check_images"] == 6  # the val split, all of it
    assert (report["calibration_split"], report["check_split"]) == ("train", "val")
    after = load_bundle(bundle_dir)
    assert after.metadata["int8"] == report and after.sha256 != before.sha256  # the graph is behaviour
    assert bundle_sha256(bundle_dir) == after.sha256  # the dashboard's registry hashes it alike
    worker = Predictor(after, threads=1)
    assert (worker.backend, worker.precision) == ("onnx", "int8")
    fp32 = Predictor(after, threads=1, precision="fp32")
    # The report is what the two graphs do on the check images (recomputed here from the same images).
    val = [load_image(images / name) for name in names[12:18]]
    again, p_fp32, p_int8 = agreement(fp32, worker, val)
    assert p_fp32.shape == p_int8.shape == (len(val), 14)
    largest = report["max_abs_probability_change"]
    assert again["max_abs_probability_change"] == pytest.approx(largest, abs=1e-5)
    assert 0 < report["max_abs_probability_change"] <= report["tolerance"]
    assert report["map_correlation_median"] > 0.5
    assert 0 <= report["val_mean_auroc_int8"] <= 1
    test = [load_image(images / name) for name in names[18:24]]
    a, b = worker.predict(test), fp32.predict(test)
    assert a.cams.shape == b.cams.shape and not np.array_equal(a.probabilities, b.probabilities)


def test_an_int8_graph_that_disagrees_is_not_written(bundle_dir: Path, shared_dir: Path) -> None:
    images, _labels, names = _dev(shared_dir)
    pixels = [load_image(images / name) for name in names[:3]]
    meta = (bundle_dir / "configs" / "metadata.json").read_text()
    with pytest.raises(QuantizationRejected, match="not written"):
        quantize_bundle(bundle_dir, pixels[:2], pixels[2:], tolerance=0.0, threads=1)
    assert not (bundle_dir / INT8_WEIGHTS).exists()
    assert (bundle_dir / "configs" / "metadata.json").read_text() == meta
    bundle = load_bundle(bundle_dir)
    assert Predictor(bundle).precision == "fp32"
    with pytest.raises(ValueError, match="int8"):
        Predictor(bundle, precision="int8")
    # A graph without its check's report (a run that died half-way) is not picked by itself.
    shutil.copy(bundle_dir / "models" / "model.onnx", bundle_dir / INT8_WEIGHTS)
    unchecked = load_bundle(bundle_dir)
    assert Predictor(unchecked).precision == "fp32"
    assert Predictor(unchecked, precision="int8").precision == "int8"  # asked for by name: it runs
