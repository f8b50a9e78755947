"""Loading a MONAI bundle: the one contract between ``monai_train`` and the worker.

Layout (MONAI bundle convention)::

    configs/metadata.json    version, labels, operating points, temperature, metrics, data summary
    configs/inference.json   network_def and preprocessing (MONAI transforms), parsed by ConfigParser
    models/model.safetensors weights (fp16 or fp32)
    models/model.onnx        optional: logits + class-activation maps as one graph (the CPU path)
    models/model.int8.onnx   optional: that graph with int8 convolutions, checked against it
    docs/README.md           model card
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.bundle.config_parser import ConfigParser
from numpy.typing import ArrayLike, NDArray
from safetensors.torch import load_file

from worker.inference.calibration import Calibration, CalibrationError

METADATA = Path("configs/metadata.json")
INFERENCE = Path("configs/inference.json")
WEIGHTS = Path("models/model.safetensors")
ONNX_WEIGHTS = Path("models/model.onnx")
# The same graph with int8 convolutions (worker.inference.quantize), checked against it when written.
INT8_WEIGHTS = Path("models/model.int8.onnx")


class BundleError(RuntimeError):
    """The bundle is missing, malformed or inconsistent: no job can run with it."""


@dataclass(frozen=True)
class Bundle:
    path: Path
    name: str
    version: str
    labels: tuple[str, ...]
    operating_points: dict[str, float]
    temperature: float
    sha256: str
    # True only when metadata says the outputs were calibrated on held-out data ("calibration").
    calibrated: bool
    metadata: dict[str, Any] = field(repr=False)
    parser: ConfigParser = field(repr=False)
    # logits → probabilities (temperature, or Platt per label): `worker.inference.calibration`.
    calibration: Calibration | None = field(default=None, repr=False)

    def probabilities(self, logits: ArrayLike) -> NDArray[np.float32]:
        """(n, n_labels) logits → float32 probabilities, exactly as every output of this bundle shows them."""
        calibration = self.calibration or Calibration.temperature(self.labels, self.temperature)
        return calibration.probabilities(logits)

    def network(self) -> torch.nn.Module:
        net = self.parser.get_parsed_content("network_def", instantiate=True)
        if not isinstance(net, torch.nn.Module):
            raise BundleError("network_def does not build a torch module")
        state = load_file(str(self.path / WEIGHTS))
        # Weights may be stored in fp16 to keep the bundle small; compute in fp32 on CPU.
        net.load_state_dict({k: v.float() for k, v in state.items()})
        return net.eval()

    def preprocessing(self) -> Any:
        return self.parser.get_parsed_content("preprocessing", instantiate=True)


def bundle_hash(path: Path) -> str:
    """sha256 over the files that define behaviour (configs and weights), in a stable order."""
    digest = hashlib.sha256()
    for rel in (METADATA, INFERENCE, WEIGHTS, ONNX_WEIGHTS, INT8_WEIGHTS):
        if rel in (ONNX_WEIGHTS, INT8_WEIGHTS) and not (path / rel).is_file():
            continue  # optional: derived from WEIGHTS for the CPU path
        digest.update(str(rel).encode())
        with (path / rel).open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def load_bundle(path: Path | str) -> Bundle:
    root = Path(path)
    for rel in (METADATA, INFERENCE, WEIGHTS):
        if not (root / rel).is_file():
            raise BundleError(f"bundle file missing: {rel}")
    metadata = json.loads((root / METADATA).read_text())
    labels = tuple(metadata.get("labels", ()))
    if not labels:
        raise BundleError("metadata.json names no labels")
    points = {str(k): float(v) for k, v in metadata.get("operating_points", {}).items()}
    missing = [lb for lb in labels if lb not in points]
    if missing:
        raise BundleError(f"no operating point for {len(missing)} labels")
    parser = ConfigParser()
    parser.read_config(str(root / INFERENCE))
    out_channels = parser.get_parsed_content("network_def#out_channels")
    if out_channels != len(labels):
        raise BundleError("network out_channels does not match the label count")
    try:
        calibration = Calibration.from_metadata(metadata, labels)
    except (CalibrationError, KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"calibration in metadata.json: {exc}") from exc
    return Bundle(
        path=root,
        name=str(metadata.get("name", root.name)),
        version=str(metadata.get("version", "0")),
        labels=labels,
        operating_points=points,
        temperature=float(metadata.get("temperature", 1.0)),
        sha256=bundle_hash(root),
        calibrated=calibration.calibrated,
        metadata=metadata,
        parser=parser,
        calibration=calibration,
    )
