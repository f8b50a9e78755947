"""Writing MONAI bundles. The inference config below is the single preprocessing definition:
training instantiates it with ConfigParser exactly as the worker does when it loads the bundle."""

from __future__ import annotations

import copy
import hashlib
import json
import platform
from pathlib import Path
from typing import Any

import monai
import torch
from monai.bundle import ConfigParser
from safetensors.torch import save_file

from worker.labels import NIH_LABELS as NIH_LABELS  # the labels a new bundle gets by default

# Inputs are display images: 2-D float32 in [0, 1], MONOCHROME2 sense (the worker's DICOM reader and
# the training PNG loader both produce exactly that).
INFERENCE_TEMPLATE: dict[str, Any] = {
    "image_size": 224,
    "num_classes": 14,
    "network_def": {
        "_target_": "monai.networks.nets.DenseNet121",
        "spatial_dims": 2,
        "in_channels": 1,
        "out_channels": "@num_classes",
    },
    "preprocessing": {
        "_target_": "monai.transforms.Compose",
        "transforms": [
            {"_target_": "monai.transforms.EnsureChannelFirst", "channel_dim": "no_channel"},
            {
                "_target_": "monai.transforms.Resize",
                "spatial_size": ["@image_size", "@image_size"],
                "mode": "area",
            },
            {"_target_": "monai.transforms.NormalizeIntensity", "subtrahend": 0.5, "divisor": 0.25},
        ],
    },
}


FEATURE_STRIDES = {32: (), 16: (3,), 8: (2, 3)}  # input pixels per CAM cell → pool-free transitions


HISTOGRAM_EQUALISATION = {
    "_target_": "monai.transforms.HistogramNormalize",
    "num_bins": 256,
    "min": 0,
    "max": 1,
}


# Contrast-limited adaptive histogram equalisation after the resize, so every image is equalised over the
# same tile geometry whatever its resolution (a 64 px thumbnail and a 1024 px film alike).
CLAHE = {"_target_": "worker.imaging.Clahe", "tiles": 8, "clip_limit": 2.0}


def inference_config(
    num_classes: int,
    image_size: int = 224,
    feature_stride: int = 32,
    histogram_equalise: bool = False,
    clahe: bool = False,
) -> dict[str, Any]:
    """The bundle's inference config; ``feature_stride`` < 32 keeps DenseNet-121's last transitions
    pool-free (`worker.inference.networks.DenseNet121Fine`) for finer class-activation maps;
    ``histogram_equalise`` equalises each display image's histogram (MONAI ``HistogramNormalize``) before
    the resize — in the bundle's preprocessing, so the worker applies it too; ``clahe`` adds CLAHE
    (`worker.imaging.clahe`) after the resize, likewise."""
    if feature_stride not in FEATURE_STRIDES:
        raise ValueError(f"feature stride must be one of {sorted(FEATURE_STRIDES)}, got {feature_stride}")
    cfg = copy.deepcopy(INFERENCE_TEMPLATE)
    cfg["num_classes"] = num_classes
    cfg["image_size"] = image_size
    transforms = cfg["preprocessing"]["transforms"]
    if clahe:
        transforms.insert(2, copy.deepcopy(CLAHE))  # after EnsureChannelFirst + Resize
    if histogram_equalise:
        transforms.insert(1, copy.deepcopy(HISTOGRAM_EQUALISATION))
    if feature_stride != 32:
        cfg["network_def"] = {
            **cfg["network_def"],
            "_target_": "worker.inference.networks.DenseNet121Fine",
            "pool_free_transitions": list(FEATURE_STRIDES[feature_stride]),
        }
    return cfg


def parse(cfg: dict[str, Any]) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(copy.deepcopy(cfg))
    return parser


def build_network(cfg: dict[str, Any]) -> torch.nn.Module:
    net = parse(cfg).get_parsed_content("network_def", instantiate=True)
    assert isinstance(net, torch.nn.Module)
    return net


def build_preprocessing(cfg: dict[str, Any]) -> Any:
    return parse(cfg).get_parsed_content("preprocessing", instantiate=True)


def export_bundle(
    out_dir: Path,
    net: torch.nn.Module,
    cfg: dict[str, Any],
    *,
    name: str,
    version: str,
    labels: tuple[str, ...],
    operating_points: dict[str, float],
    temperature: float,
    metrics: dict[str, Any],
    calibration: dict[str, Any] | None = None,
    training_data: dict[str, Any],
    model_card: str,
    fp16: bool = True,
    onnx: bool = True,
) -> Path:
    (out_dir / "configs").mkdir(parents=True, exist_ok=True)
    (out_dir / "models").mkdir(parents=True, exist_ok=True)
    (out_dir / "docs").mkdir(parents=True, exist_ok=True)
    state = {
        k: (v.half() if fp16 and v.is_floating_point() else v).contiguous().cpu()
        for k, v in net.state_dict().items()
    }
    save_file(state, str(out_dir / "models" / "model.safetensors"))
    (out_dir / "configs" / "inference.json").write_text(json.dumps(cfg, indent=2) + "\n")
    weights_sha = hashlib.sha256((out_dir / "models" / "model.safetensors").read_bytes()).hexdigest()
    metadata = {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json",
        "name": name,
        "version": version,
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": __import__("numpy").__version__,
        "required_packages_version": {"safetensors": __import__("safetensors").__version__},
        "task": "Multi-label classification of 14 ChestX-ray14 findings on frontal chest radiographs",
        "description": "DenseNet-121 (MONAI) with class-activation heatmaps. NOT FOR DIAGNOSTIC USE.",
        "authors": "cxr-gateway",
        "copyright": "cxr-gateway contributors",
        "intended_use": "Demonstration and integration testing only; not a medical device.",
        "labels": list(labels),
        "operating_points": {k: float(operating_points[k]) for k in labels},
        "temperature": float(temperature),
        **({"calibration": calibration} if calibration else {}),
        "metrics": metrics,
        "training_data": training_data,
        "weights_sha256": weights_sha,
        "built_on": platform.platform(),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "XR",
                    "num_channels": 1,
                    "spatial_shape": [cfg["image_size"], cfg["image_size"]],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_patch_data": False,
                    "channel_def": {"0": "X-ray, MONOCHROME2 display values"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities",
                    "format": "classes",
                    "num_channels": len(labels),
                    "spatial_shape": [1],
                    "dtype": "float32",
                    "value_range": [0, 1],
                    "is_onehot": False,
                    "channel_def": {str(i): lb for i, lb in enumerate(labels)},
                }
            },
        },
    }
    (out_dir / "configs" / "metadata.json").write_text(json.dumps(metadata, indent=2) + "\n")
    (out_dir / "docs" / "README.md").write_text(model_card)
    if onnx:
        # The worker's CPU path runs this with ONNX Runtime; it is built from the weights just written.
        from worker.inference.onnx import export_onnx

        export_onnx(out_dir)
    return out_dir


def export_untrained(
    out_dir: Path,
    cfg: dict[str, Any],
    *,
    seed: int,
    version: str,
    model_card: str,
    name: str = "cxr14_densenet121",
    training_data: dict[str, Any] | None = None,
    fp16: bool = True,
    onnx: bool = True,
) -> Path:
    """A bundle of a randomly initialised network (``torch.manual_seed(seed)``) over the NIH labels, every
    operating point 0.5: for the gateway's end-to-end runs and speed benchmarks, never for its outputs."""
    torch.manual_seed(seed)
    return export_bundle(
        out_dir,
        build_network(cfg),
        cfg,
        name=name,
        version=version,
        labels=NIH_LABELS,
        operating_points=dict.fromkeys(NIH_LABELS, 0.5),
        temperature=1.0,
        metrics={},
        training_data=training_data or {},
        model_card=model_card,
        fp16=fp16,
        onnx=onnx,
    )
