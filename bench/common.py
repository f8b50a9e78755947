"""What the benchmarks share: a randomly initialised DenseNet-121 bundle at a chosen input size."""

from __future__ import annotations

from pathlib import Path

import torch

from monai_train.bundle import NIH_LABELS, build_network, export_bundle, inference_config


def random_bundle(folder: Path, size: int, seed: int = 0, feature_stride: int = 32) -> Path:
    """A bundle (fp32 weights and models/model.onnx) whose speed, not accuracy, is measured."""
    cfg = inference_config(len(NIH_LABELS), image_size=size, feature_stride=feature_stride)
    torch.manual_seed(seed)
    return export_bundle(
        folder,
        build_network(cfg),
        cfg,
        name="bench",
        version="bench",
        labels=NIH_LABELS,
        operating_points=dict.fromkeys(NIH_LABELS, 0.5),
        temperature=1.0,
        metrics={},
        training_data={},
        model_card="bench",
        fp16=False,
    )
