"""Networks read from bundles: the weights a bundle ships, its classification head, and a fine-tuning start
that keeps the output neurons of the labels two label sets share."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from monai_train.bundle import build_network, inference_config
from monai_train.data import LeakageError, Splits
from monai_train.split_file import read_split_file, split_path

log = logging.getLogger("monai_train")


def load_bundle_network(bundle_dir: Path) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(network with weights in fp32, inference config, metadata) of a bundle written by export_bundle."""
    cfg = json.loads((bundle_dir / "configs" / "inference.json").read_text())
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    net = build_network(cfg)
    state = load_file(str(bundle_dir / "models" / "model.safetensors"))
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net, cfg, meta


def head(net: torch.nn.Module) -> torch.nn.Linear:
    out = getattr(getattr(net, "class_layers", None), "out", None)
    if not isinstance(out, torch.nn.Linear):
        raise TypeError("expected a MONAI DenseNet with class_layers.out")
    return out


def init_from_bundle(
    bundle_dir: Path, labels: Sequence[str], image_size: int | None = None, feature_stride: int | None = None
) -> tuple[torch.nn.Module, dict[str, Any], list[str]]:
    """A network for ``labels`` that starts from a bundle's weights.

    The backbone is copied whole; the final Linear keeps the rows (weights and bias) of labels present in
    both label sets and leaves the others at their fresh initialisation. Returns the shared labels.
    ``feature_stride`` (None: the source's) may differ from the source's: DenseNet-121 and
    `DenseNet121Fine` have the same weights, only the transitions' pooling differs.
    """
    old_net, old_cfg, meta = load_bundle_network(bundle_dir)
    old_labels = list(meta["labels"])
    size = image_size or int(old_cfg.get("image_size", 224))
    cfg = inference_config(len(labels), size, feature_stride or 32)
    if feature_stride is None:
        cfg["network_def"] = {**old_cfg["network_def"], "out_channels": "@num_classes"}
    cfg["preprocessing"] = old_cfg["preprocessing"]
    net = build_network(cfg)
    old_state = old_net.state_dict()
    new_head, old_head = head(net), head(old_net)
    head_keys = {f"class_layers.out.{k}" for k in ("weight", "bias")}
    net.load_state_dict({k: v for k, v in old_state.items() if k not in head_keys}, strict=False)
    shared = [lb for lb in labels if lb in old_labels]
    with torch.no_grad():
        for lb in shared:
            i, j = list(labels).index(lb), old_labels.index(lb)
            new_head.weight[i] = old_head.weight[j]
            new_head.bias[i] = old_head.bias[j]
    return net, cfg, shared


def check_finetune_leakage(source_bundle: Path, splits: Splits) -> None:
    """A patient the source bundle learned from (train/val) must not be in the new test split: the
    fine-tuned model inherits that knowledge, so its test metrics would be inflated."""
    rows = read_split_file(source_bundle)
    if rows is None:
        log.warning(
            "%s is missing: cannot check fine-tuning against its training patients", split_path(source_bundle)
        )
        return
    learned = {patient for _, patient, split in rows if split in {"train", "val"}}
    leaked = sorted({r.patient_id for r in splits.test} & learned)
    if leaked:
        raise LeakageError(
            f"patient leakage: {len(leaked)} patients of the new test split were in {source_bundle}'s "
            f"training/validation data (e.g. {', '.join(leaked[:5])}); split so that they stay out of test"
        )
