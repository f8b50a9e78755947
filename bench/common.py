"""What the benchmarks share: a randomly initialised DenseNet-121 bundle at a chosen input size."""

from __future__ import annotations

from pathlib import Path

from monai_train.bundle import NIH_LABELS, export_untrained, inference_config


def random_bundle(folder: Path, size: int, seed: int = 0, feature_stride: int = 32) -> Path:
    """A bundle (fp32 weights and models/model.onnx) whose speed, not accuracy, is measured."""
    cfg = inference_config(len(NIH_LABELS), image_size=size, feature_stride=feature_stride)
    return export_untrained(
        folder, cfg, seed=seed, name="bench", version="bench", model_card="bench", fp16=False
    )
