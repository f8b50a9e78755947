"""What a training run is told (``TrainConfig``) and what it returns (``TrainResult``), and which of those
settings make two runs the same run (a checkpoint's fingerprint) or are stored in ``configs/train.json``."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from monai_train.bundle import NIH_LABELS


class TrainingStopped(RuntimeError):
    """``stop_after`` ended the run early; its checkpoint continues it with ``resume=True``."""


@dataclass
class TrainConfig:
    labels: tuple[str, ...] = NIH_LABELS
    image_size: int = 224
    feature_stride: int = 32  # 8: 16 × 16 CAM cells at 128² (worker.inference.networks.DenseNet121Fine)
    histogram_equalise: bool = False  # per-image histogram equalisation in the bundle's preprocessing
    clahe: bool = False  # CLAHE (worker.imaging.clahe) after the resize, in the bundle's preprocessing
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3  # one-cycle peak
    weight_decay: float = 1e-4
    loss: str = "bce"
    focal_gamma: float = 2.0
    pos_weight_max: float = 20.0  # clip: a label with 1 positive in 1000 must not dominate the loss
    augment: bool = True
    # Resolution matching: this share of training images is pooled down to ``low_res`` pixels and back
    # (what a 64 px thumbnail becomes at the input size), so full-resolution images look like the thumbnails
    # most training images are. 0: off.
    low_res: int = 0
    low_res_prob: float = 0.5
    # Distillation: weight of a BCE towards ``reference_predictions`` (soft targets) on the training images
    # the reference scored; validation and test images never get them. 0: the reference is only compared.
    distill_weight: float = 0.0
    seed: int = 0
    operating_point: str = "f1"
    log_every: int = 20
    device: str = "auto"
    checkpoint_dir: Path | None = None
    resume: bool = False
    name: str = "cxr14_densenet121"
    version: str = "0.1.0"
    fp16_export: bool = True
    # Also write the checked int8 CPU graph (models/model.int8.onnx, as `monai_train quantize` does).
    int8_export: bool = False
    reference_predictions: Path | None = None
    notes: str = ""
    init_from: Path | None = None  # fine-tuning: bundle the network starts from
    stop_after: int | None = None  # stop after this epoch (time-boxed jobs); continue with resume=True
    cache_dir: Path | None = None  # preprocessed images (default: <checkpoint_dir>/cache)
    workers: int = 0  # processes decoding into the cache and DataLoader workers reading it
    tensorboard: bool = True  # event files under <checkpoint_dir>/tensorboard
    input_report: dict[str, Any] = field(default_factory=dict)  # DICOM folders: gate decisions per folder


@dataclass
class TrainResult:
    bundle: Path
    history: list[dict[str, Any]]
    best_epoch: int
    temperature: float
    operating_points: dict[str, float]
    metrics: dict[str, Any]
    test_names: list[str]
    test_probabilities: npt.NDArray[np.float32]
    extra: dict[str, Any] = field(default_factory=dict)


# Settings that change what the network learns; both lists below start from these.
_LEARNING_SETTINGS = (
    "labels",
    "image_size",
    "feature_stride",
    "histogram_equalise",
    "clahe",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "loss",
    "focal_gamma",
    "pos_weight_max",
    "augment",
    "low_res",
    "low_res_prob",
    "distill_weight",
    "seed",
)
# A checkpoint resumes only a run with all of these equal (logging, device, paths, naming, export
# precision and post-training choices may differ).
RUN_SETTINGS = (*_LEARNING_SETTINGS, "init_from")
# What a configs/train.json may hold (and `train --config` reads back); CLI flags override them.
TRAIN_SETTINGS = (*_LEARNING_SETTINGS, "operating_point", "name")


def _settings(tc: TrainConfig, names: tuple[str, ...]) -> dict[str, Any]:
    out = {k: getattr(tc, k) for k in names}
    out["labels"] = list(tc.labels)
    if "init_from" in out:
        out["init_from"] = str(tc.init_from) if tc.init_from else None
    return out


def train_settings(tc: TrainConfig) -> dict[str, Any]:
    return _settings(tc, TRAIN_SETTINGS)


def fingerprint(tc: TrainConfig, total_steps: int, data_sha: str, val_sha: str = "") -> dict[str, Any]:
    """The run a checkpoint belongs to: its settings, schedule length and training/validation data."""
    soft = str(tc.reference_predictions) if tc.distill_weight > 0 else None  # the soft targets' source
    return {
        **_settings(tc, RUN_SETTINGS),
        **({"distill_from": soft} if soft else {}),
        "total_steps": total_steps,
        "data_sha256": data_sha,
        "val_sha256": val_sha,
    }
