"""Scale: a disk cache of preprocessed images streamed to training, batch augmentation, bad input skipped."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from monai_train.bundle import NIH_LABELS, build_preprocessing, inference_config
from monai_train.cache import Augmentation, CachedImages, augment_batch, build_cache, preprocessed
from monai_train.config import TrainConfig, TrainResult, fingerprint
from monai_train.data import Record, Splits, read_records
from monai_train.train import train_and_export


def _records(small_set: Path, n: int) -> list[Record]:
    return read_records(small_set / "images", small_set / "labels.csv", NIH_LABELS)[:n]


def test_cache_holds_exactly_the_workers_tensor_and_is_built_once(small_set: Path, tmp_path: Path) -> None:
    cfg = inference_config(14, 32)
    recs = _records(small_set, 12)
    first = build_cache(recs, cfg, tmp_path / "c", workers=2)
    assert first.built == 12 and first.skipped == {} and len(first.records) == 12
    again = build_cache(recs, cfg, tmp_path / "c")
    assert again.built == 0 and len(again.records) == 12
    ds = CachedImages(recs, cfg, tmp_path / "c")
    direct = preprocessed(recs[3].image, build_preprocessing(cfg))
    item = ds[3]
    assert torch.equal(item["image"], direct) and item["name"] == recs[3].name
    assert np.array_equal(item["label"].numpy(), np.asarray(recs[3].labels, np.float32))
    # Another input size is another cache entry, not a stale tensor.
    assert build_cache(recs[:2], inference_config(14, 48), tmp_path / "c").built == 2


def test_bad_images_are_skipped_and_counted_never_fatal(small_set: Path, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    shutil.copytree(small_set / "images", folder)
    recs = read_records(folder, small_set / "labels.csv", NIH_LABELS)[:40]
    (folder / recs[0].name).write_bytes(b"not a png")
    (folder / recs[1].name).write_bytes(b"")
    report = build_cache(recs, inference_config(14, 32), tmp_path / "c")
    assert report.skipped == {"pixel_decode_error": 2} and len(report.records) == 38
    assert recs[0] not in report.records and recs[0].name in report.skipped_examples["pixel_decode_error"][0]


def test_batch_augmentation_is_seeded_mild_and_shape_preserving() -> None:
    x = torch.randn(8, 1, 32, 32)
    a = augment_batch(x, torch.Generator().manual_seed(3))
    b = augment_batch(x, torch.Generator().manual_seed(3))
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.equal(a, augment_batch(x, torch.Generator().manual_seed(4)))
    none = Augmentation(rotate_prob=0, zoom_prob=0, gamma_prob=0, contrast_prob=0, brightness_prob=0)
    assert torch.equal(augment_batch(x, torch.Generator().manual_seed(3), none), x)
    # No flips: the left half stays, on average, where it was.
    img = torch.zeros(16, 1, 32, 32)
    img[..., :16] = 1.0
    out = augment_batch(img, torch.Generator().manual_seed(0))
    assert float(out[..., :16].mean()) > float(out[..., 16:].mean()) + 0.5


def test_a_checkpoint_resumes_only_the_same_settings() -> None:
    tc = TrainConfig()
    base = fingerprint(tc, 100, "a", "b")
    changes = (
        {"lr": 2e-3},
        {"augment": False},
        {"feature_stride": 8},
        {"pos_weight_max": 5.0},
        {"low_res": 64},
    )
    for change in (*changes, {"distill_weight": 1.0, "reference_predictions": Path("r.csv")}):
        other = TrainConfig(**change)  # type: ignore[arg-type]
        assert fingerprint(other, 100, "a", "b") != base, change
    assert fingerprint(TrainConfig(log_every=1, version="x", workers=2), 100, "a", "b") == base
    assert fingerprint(tc, 100, "a", "c") != base  # another validation split


def test_training_skips_unreadable_images_and_writes_tensorboard_events(
    small_set: Path, tmp_path: Path, trained: TrainResult
) -> None:
    events = list(
        (trained.bundle.parent / "bundle.checkpoints" / "tensorboard").glob("events.out.tfevents.*")
    )
    assert events, "no TensorBoard event file"
    folder = tmp_path / "images"
    shutil.copytree(small_set / "images", folder)
    recs = read_records(folder, small_set / "labels.csv", NIH_LABELS)
    by_patient: dict[str, list[Record]] = {}
    for r in recs:
        by_patient.setdefault(r.patient_id, []).append(r)
    chosen = [by_patient[p][0] for p in sorted(by_patient, key=int)[:24]]
    (folder / chosen[0].name).write_bytes(b"garbage")
    splits = Splits(train=chosen[:16], val=chosen[16:20], test=chosen[20:])
    tc = TrainConfig(image_size=32, epochs=1, batch_size=8, log_every=0, tensorboard=False)
    result = train_and_export(splits, tc, tmp_path / "b")
    from worker.inference.bundle import load_bundle

    meta = load_bundle(tmp_path / "b").metadata["training_data"]
    assert meta["skipped"]["counts"] == {"pixel_decode_error": 1} and meta["images"] == 15
    assert result.history and len(result.test_names) == 4


@pytest.mark.parametrize("workers", [0, 2])
def test_loader_workers_give_the_same_batches(small_set: Path, tmp_path: Path, workers: int) -> None:
    cfg = inference_config(14, 32)
    recs = _records(small_set, 10)
    build_cache(recs, cfg, tmp_path / "c")
    ds = CachedImages(recs, cfg, tmp_path / "c")
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=workers)
    names = [n for batch in loader for n in batch["name"]]
    assert names == [r.name for r in recs]
