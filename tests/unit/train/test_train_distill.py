"""Cheap ideas against the resolution shift and the small data: simulated thumbnails and distillation."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_train.bundle import NIH_LABELS, inference_config
from monai_train.cache import CachedImages, build_cache, simulate_low_resolution
from monai_train.config import TrainConfig
from monai_train.data import Splits
from monai_train.losses import distillation_loss
from monai_train.train import train_and_export


def test_simulated_thumbnails_leave_a_thumbnail_alone_and_blur_a_full_resolution_image() -> None:
    gen = torch.Generator().manual_seed(0)
    thumb = torch.randn(4, 1, 16, 16).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)  # 16 → 32
    assert torch.allclose(simulate_low_resolution(thumb, 16, 1.0, gen), thumb, atol=1e-6)
    fine = torch.randn(4, 1, 32, 32)
    out = simulate_low_resolution(fine, 16, 1.0, gen)
    assert out.shape == fine.shape and not torch.allclose(out, fine)
    assert torch.equal(out[..., 0::2, 0::2], out[..., 1::2, 1::2])  # 2 × 2 blocks: a 16 px image
    assert torch.equal(simulate_low_resolution(fine, 16, 0.0, gen), fine)
    some = simulate_low_resolution(torch.randn(64, 1, 32, 32), 16, 0.5, torch.Generator().manual_seed(1))
    changed = int((some[..., 0::2, 0::2] != some[..., 1::2, 1::2]).flatten(1).any(1).sum())
    assert 16 < changed < 48  # about half


def test_distillation_pulls_towards_the_soft_targets_only_where_there_are_some() -> None:
    logits = torch.zeros(3, 2, requires_grad=True)
    soft = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.0, 0.0]])
    assert float(distillation_loss(logits, soft, torch.zeros(3))) == 0.0
    loss = distillation_loss(logits, soft, torch.tensor([1.0, 1.0, 0.0]))
    loss.backward()
    assert logits.grad is not None
    assert (logits.grad[:2, 0] < 0).all() and (logits.grad[:2, 1] > 0).all()  # up towards 0.9, down to 0.1
    assert torch.equal(logits.grad[2], torch.zeros(2))


def _reference_csv(path: Path, names: list[str]) -> Path:
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", *(f"prob_{lb}" for lb in NIH_LABELS)])
        for i, name in enumerate(names):
            writer.writerow([name, *(f"{(i * 7 + j) % 10 / 10:.2f}" for j in range(len(NIH_LABELS)))])
    return path


def test_soft_targets_reach_the_training_batches_of_the_images_the_reference_scored(
    tiny_splits: Splits, tmp_path: Path
) -> None:
    cfg = inference_config(14, 32)
    recs = tiny_splits.train[:6]
    build_cache(recs, cfg, tmp_path / "c")
    names = [r.name for r in recs[:2]]
    soft = {n: np.full(14, 0.25, np.float32) for n in names}
    ds = CachedImages(recs, cfg, tmp_path / "c", soft)
    assert float(ds[0]["soft_mask"]) == 1.0 and torch.allclose(ds[0]["soft"], torch.full((14,), 0.25))
    assert float(ds[3]["soft_mask"]) == 0.0 and float(ds[3]["soft"].abs().sum()) == 0.0


def test_distilled_training_differs_records_its_setting_and_needs_a_reference(
    tiny_splits: Splits, tmp_path: Path
) -> None:
    ref = _reference_csv(tmp_path / "ref.csv", [r.name for r in tiny_splits.train])
    common = {"image_size": 32, "epochs": 1, "batch_size": 8, "log_every": 0, "tensorboard": False}
    plain = train_and_export(tiny_splits, TrainConfig(**common, cache_dir=tmp_path / "c"), tmp_path / "a")
    distilled = train_and_export(
        tiny_splits,
        TrainConfig(**common, cache_dir=tmp_path / "c", distill_weight=2.0, reference_predictions=ref),
        tmp_path / "b",
    )
    assert distilled.history[0]["train_loss"] != pytest.approx(plain.history[0]["train_loss"], rel=1e-6)
    stored = json.loads((tmp_path / "b" / "configs" / "train.json").read_text())
    assert stored["distill_weight"] == 2.0
    assert "distillation" in (tmp_path / "b" / "docs" / "README.md").read_text()
    with pytest.raises(ValueError, match="reference-predictions"):
        train_and_export(tiny_splits, TrainConfig(**common, distill_weight=1.0), tmp_path / "c2")
