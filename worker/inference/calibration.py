"""From a bundle's logits to the probabilities every output shows: one definition for the worker and for
training's evaluation (``monai_train`` imports this module), so they cannot disagree.

A bundle's ``configs/metadata.json`` says how its logits become probabilities:

- ``"calibration": {"calibrated": true, "method": "platt", "per_label": {label: {"scale": a, "bias": b}}}``:
  p = sigmoid(a · logit + b) per finding (Platt scaling, fitted on the validation split). Only such a bundle
  is *calibrated*: the SR and SC then call its values probabilities.
- otherwise ``"temperature": T`` (1 when absent): p = sigmoid(logit / T) for every finding. Uncalibrated
  unless ``calibration.calibrated`` says otherwise.

Every per-label map here is increasing (scale > 0), so a threshold on one scale has exactly one
equivalent on the other (`Calibration.equivalent_threshold`): recalibrating a bundle changes no decision.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ["METHODS", "Calibration", "CalibrationError"]

METHODS = ("temperature", "platt")


class CalibrationError(ValueError):
    """The bundle's calibration block is malformed (unknown method, missing label, non-positive scale)."""


@dataclass(frozen=True)
class Calibration:
    """p = sigmoid(scale · logit + bias), per label, in float64; probabilities returned as float32."""

    method: str
    labels: tuple[str, ...]
    scale: tuple[float, ...]
    bias: tuple[float, ...]
    calibrated: bool

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise CalibrationError(f"calibration method must be one of {METHODS}, got {self.method!r}")
        if not len(self.labels) == len(self.scale) == len(self.bias):
            raise CalibrationError("calibration needs one scale and one bias per label")
        for lb, a, b in zip(self.labels, self.scale, self.bias, strict=True):
            if not (math.isfinite(a) and math.isfinite(b)) or a <= 0.0:
                raise CalibrationError(f"calibration of {lb}: scale {a} and bias {b} (scale must be > 0)")

    @classmethod
    def temperature(
        cls, labels: Sequence[str], temperature: float, *, calibrated: bool = False
    ) -> Calibration:
        if not math.isfinite(temperature) or temperature <= 0.0:
            raise CalibrationError(f"temperature must be a positive number, got {temperature}")
        n = len(labels)
        return cls("temperature", tuple(labels), (1.0 / temperature,) * n, (0.0,) * n, calibrated)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], labels: Sequence[str]) -> Calibration:
        block = metadata.get("calibration") or {}
        if not isinstance(block, Mapping):
            raise CalibrationError("metadata 'calibration' must be an object")
        calibrated = bool(block.get("calibrated", False))
        method = str(block.get("method", "temperature"))
        if method == "platt":
            per = block.get("per_label") or {}
            missing = [lb for lb in labels if lb not in per]
            if missing:
                raise CalibrationError(f"Platt calibration lacks {', '.join(missing)}")
            return cls(
                "platt",
                tuple(labels),
                tuple(float(per[lb]["scale"]) for lb in labels),
                tuple(float(per[lb]["bias"]) for lb in labels),
                calibrated,
            )
        if method != "temperature":
            raise CalibrationError(f"calibration method must be one of {METHODS}, got {method!r}")
        return cls.temperature(labels, float(metadata.get("temperature", 1.0)), calibrated=calibrated)

    def probabilities(self, logits: ArrayLike) -> NDArray[np.float32]:
        """(n, n_labels) logits → (n, n_labels) probabilities."""
        z = np.asarray(logits, dtype=np.float64)
        if z.ndim != 2 or z.shape[1] != len(self.labels):
            raise CalibrationError(f"logits of shape {z.shape} for {len(self.labels)} labels")
        s = z * np.asarray(self.scale) + np.asarray(self.bias)
        probs: NDArray[np.float32] = (0.5 * (1.0 + np.tanh(0.5 * s))).astype(np.float32)  # no overflow
        return probs

    def logit(self, label: str, probability: float) -> float:
        """The logit that this calibration maps to ``probability`` for ``label`` (the inverse map)."""
        i = self.labels.index(label)
        t = min(max(float(probability), 1e-12), 1.0 - 1e-12)
        return (math.log(t / (1.0 - t)) - self.bias[i]) / self.scale[i]

    def probability(self, label: str, logit: float) -> float:
        i = self.labels.index(label)
        return 1.0 / (1.0 + math.exp(-(self.scale[i] * float(logit) + self.bias[i])))

    def equivalent_threshold(self, other: Calibration, label: str, threshold: float) -> float:
        """The threshold on ``other``'s scale that makes the decisions ``threshold`` makes on this one."""
        return other.probability(label, self.logit(label, threshold))

    def as_metadata(self) -> dict[str, Any]:
        return {
            "calibrated": self.calibrated,
            "method": self.method,
            "per_label": {
                lb: {"scale": a, "bias": b}
                for lb, a, b in zip(self.labels, self.scale, self.bias, strict=True)
            },
        }
