from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from monai_train.__main__ import main
from monai_train.bundle import NIH_LABELS
from monai_train.config import TrainConfig, TrainResult
from monai_train.data import LeakageError, Splits, load_image
from monai_train.loop import fit
from monai_train.network import head, init_from_bundle, load_bundle_network
from monai_train.train import train_and_export
from worker.inference.bundle import load_bundle
from worker.inference.predictor import Predictor


def test_training_lowers_the_loss_and_writes_a_loadable_bundle(trained: TrainResult) -> None:
    losses = [h["train_loss"] for h in trained.history]
    assert len(losses) == 2 and losses[1] < losses[0]
    bundle = load_bundle(trained.bundle)
    assert bundle.labels == NIH_LABELS and bundle.version == "0.0.1-test"
    assert bundle.temperature == pytest.approx(trained.temperature)
    assert bundle.operating_points == pytest.approx(trained.operating_points)
    meta = bundle.metadata
    assert meta["training_data"]["images"] == meta["training_data"]["splits"]["train"]["images"] >= 30
    assert len(meta["training_data"]["sha256"]) == 64 and meta["training_data"]["split_unit"] == "patient"
    assert json.loads((trained.bundle / "configs/inference.json").read_text())["image_size"] == 32
    assert meta["metrics"]["n_images"] == len(trained.test_names) > 0
    card = (trained.bundle / "docs/README.md").read_text()
    assert "Not for clinical use" in card and "random" in card
    for name in ("metrics.json", "roc.png", "pr.png", "test_predictions.csv", "splits.csv"):
        assert (trained.bundle / "docs" / name).is_file()
    reference = json.loads((trained.bundle / "docs/reference_distribution.json").read_text())
    assert set(reference["scores"]) == set(NIH_LABELS)
    # --int8: the CPU worker's int8 graph, checked on the validation split (its report in metadata).
    assert (trained.bundle / "models/model.int8.onnx").is_file()
    assert meta["int8"]["check_images"] == meta["training_data"]["splits"]["val"]["images"]


def test_worker_predictor_matches_training_time_evaluation(trained: TrainResult, tiny_splits: Splits) -> None:
    by_name = {r.name: r for r in tiny_splits.test}
    images = [load_image(by_name[n].image) for n in trained.test_names]
    bundle = load_bundle(trained.bundle)
    probs = Predictor(bundle, precision="fp32").predict(images).probabilities
    np.testing.assert_allclose(probs, trained.test_probabilities, atol=1e-3)
    # Tighter in practice: training evaluates the fp16-rounded weights that ship.
    assert float(np.abs(probs - trained.test_probabilities).max()) < 1e-5
    # The worker's default on a CPU, the int8 graph: within the tolerance its check held it to.
    worker = Predictor(bundle)
    assert worker.precision == "int8"
    int8 = worker.predict(images).probabilities
    assert float(np.abs(int8 - trained.test_probabilities).max()) <= bundle.metadata["int8"]["tolerance"]


def test_evaluate_runs_the_bundle_like_the_worker(
    trained: TrainResult, tiny_splits: Splits, small_set: Path, tmp_path: Path
) -> None:
    # A label CSV for the test images only, and a "reference" that knows the answers (AUROC 1).
    names = set(trained.test_names)
    with (small_set / "labels.csv").open(newline="") as fh:
        rows = [r for r in csv.reader(fh)]
    (tmp_path / "labels.csv").write_text(
        "\n".join(",".join(r) for r in [rows[0]] + [r for r in rows[1:] if r[0] in names])
    )
    y = np.asarray([r.labels for r in tiny_splits.test], dtype=float)
    with (tmp_path / "ref.csv").open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Image Index", *(f"prob_{lb}" for lb in NIH_LABELS)])
        for rec, row in zip(tiny_splits.test, y, strict=True):
            w.writerow([rec.name, *row])
    out = tmp_path / "eval" / "metrics.json"
    main(
        [
            "evaluate",
            "--images",
            str(small_set / "images"),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--bundle",
            str(trained.bundle),
            "--out",
            str(out),
            "--heatmaps",
            str(tmp_path / "cams"),
            "--compare-reference",
            str(tmp_path / "ref.csv"),
            "--threads",
            "1",
            "--precision",
            "fp32",  # what training measured; the int8 graph is held to fp32 by its own check
        ]
    )
    m = json.loads(out.read_text())
    assert m["inference"]["precision"] == "fp32"
    assert m["n_images"] == len(names) and m["bundle"]["version"] == "0.0.1-test"
    # metrics.json's AUROC is sklearn's on the worker's own probabilities.
    with (out.parent / "metrics_predictions.csv").open(newline="") as fh:
        pred = {r["Image Index"]: r for r in csv.DictReader(fh)}
    truth = {r.name: r.labels for r in tiny_splits.test}
    order = sorted(pred)
    for i, lb in enumerate(NIH_LABELS):
        yi = [truth[n][i] for n in order]
        if 0 < sum(yi) < len(yi):
            expected = roc_auc_score(yi, [float(pred[n][f"prob_{lb}"]) for n in order])
            assert m["auroc"][lb] == pytest.approx(expected, abs=1e-5)
        else:
            assert m["auroc"][lb] is None
    # evaluate and training-time test metrics agree: same bundle, same images.
    assert m["mean_auroc"] == pytest.approx(trained.metrics["mean_auroc"], abs=1e-3)
    assert m["reference_comparison"]["reference"]["mean_auroc"] == pytest.approx(1.0)
    assert (out.parent / "metrics_roc.png").is_file() and (out.parent / "metrics_pr.png").is_file()
    cam = np.load(tmp_path / "cams" / Path(order[0]).stem / "Effusion.npy")
    assert cam.ndim == 2 and cam.dtype == np.float32 and 0.0 <= cam.min() <= cam.max() <= 1.0
    assert len(list((tmp_path / "cams").iterdir())) == len(names)


def test_finetune_keeps_shared_output_neurons(trained: TrainResult) -> None:
    old_net, _, _ = load_bundle_network(trained.bundle)
    torch.manual_seed(123)
    net, cfg, shared = init_from_bundle(trained.bundle, ["Pneumothorax", "Lung_Opacity"])
    assert shared == ["Pneumothorax"] and cfg["num_classes"] == 2 and cfg["image_size"] == 32
    old, new = head(old_net), head(net)
    assert torch.equal(new.weight[0], old.weight[NIH_LABELS.index("Pneumothorax")])
    assert torch.equal(new.bias[0], old.bias[NIH_LABELS.index("Pneumothorax")])
    assert not any(torch.equal(new.weight[1], row) for row in old.weight)  # a new label: fresh init
    backbone_old = {k: v for k, v in old_net.state_dict().items() if not k.startswith("class_layers.out")}
    backbone_new = net.state_dict()
    assert all(torch.equal(v, backbone_new[k]) for k, v in backbone_old.items())


def test_finetune_cli_writes_a_two_label_bundle(
    trained: TrainResult, shared_dir: Path, tmp_path: Path
) -> None:
    # New data (dev images: other patients), new label set; size and preprocessing come from the bundle.
    dev = shared_dir / "data" / "nih-cxr14-dev"
    out = tmp_path / "ft"
    argv = ["finetune", "--from", str(trained.bundle), "--label-set", "Effusion,Pneumothorax"]
    argv += ["--images", str(dev / "images"), "--labels", str(dev / "labels.csv"), "--out", str(out)]
    argv += ["--epochs", "1", "--batch-size", "8", "--version", "0.0.2-ft", "--limit", "30"]
    argv += ["--split", "0.6,0.2,0.2", "--threads", "1", "--log-every", "0"]
    main(argv)
    bundle = load_bundle(out)
    assert bundle.labels == ("Effusion", "Pneumothorax")
    assert json.loads((out / "configs/inference.json").read_text())["image_size"] == 32
    assert "fine-tuned from" in (out / "docs/README.md").read_text()
    assert Predictor(bundle).predict([np.zeros((40, 40), np.float32)]).probabilities.shape == (1, 2)


def test_finetune_refuses_a_test_split_the_source_learned_from(
    trained: TrainResult, tiny_splits: Splits, tmp_path: Path
) -> None:
    swapped = Splits(train=tiny_splits.test, val=tiny_splits.val, test=tiny_splits.train)
    tc = TrainConfig(labels=("Effusion",), image_size=32, epochs=1, init_from=trained.bundle, log_every=0)
    with pytest.raises(LeakageError, match=r"patients of the new test split were in"):
        train_and_export(swapped, tc, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_resume_continues_exactly_where_it_stopped(
    trained: TrainResult, tiny_splits: Splits, tmp_path: Path
) -> None:
    from monai_train.bundle import build_network, inference_config

    def run(**kw: object) -> tuple[int, list[dict[str, object]]]:
        tc = TrainConfig(
            labels=NIH_LABELS,
            image_size=32,
            epochs=2,
            batch_size=8,
            lr=1e-3,
            seed=0,
            log_every=0,
            checkpoint_dir=tmp_path / "ckpt",
        )
        for k, v in kw.items():
            setattr(tc, k, v)
        torch.manual_seed(tc.seed)  # as train_and_export builds its network
        cfg = inference_config(14, 32)
        _, best_epoch, history, _, _ = fit(build_network(cfg), tiny_splits, cfg, tc)
        return best_epoch, history

    assert len(run(stop_after=1)[1]) == 1  # "killed" after epoch 1
    best_epoch, history = run(resume=True)  # epoch 2 only, from the checkpoint
    assert [h["epoch"] for h in history] == [1, 2] and best_epoch == trained.best_epoch
    # Bit-for-bit the uninterrupted run: same weights after epoch 2 (per-epoch seeded shuffle/augment).
    straight = torch.load(trained.bundle.parent / "bundle.checkpoints" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=False)
    for k, v in straight["model"].items():
        torch.testing.assert_close(resumed["model"][k], v, rtol=0, atol=1e-6)
    assert [h["train_loss"] for h in history] == pytest.approx([h["train_loss"] for h in trained.history])
    with pytest.raises(ValueError, match="different run"):  # another schedule is refused, not mixed
        run(resume=True, epochs=3)
