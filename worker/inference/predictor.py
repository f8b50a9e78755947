"""Probabilities and class-activation maps for every label from one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.typing import NDArray

from worker.inference.bundle import Bundle


@dataclass(frozen=True)
class Prediction:
    probabilities: NDArray[np.float32]  # (n_images, n_labels), calibrated by the bundle's temperature
    cams: NDArray[np.float32]  # (n_images, n_labels, h, w), each map scaled to [0, 1]


class Predictor:
    """Runs a bundle's network on display images (float32 2-D arrays in [0, 1], MONOCHROME2 sense).

    For a global-pooling + linear head (DenseNet), the activation map of class c is the head's weights
    for c applied to the final feature map, so all classes' maps cost one forward pass and one einsum,
    not one backward pass per class as Grad-CAM would.
    """

    def __init__(self, bundle: Bundle, device: str = "cpu", threads: int = 0) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.device = torch.device(device)
        self.net = bundle.network().to(self.device)
        self.preprocess = bundle.preprocessing()
        head = getattr(getattr(self.net, "class_layers", None), "out", None)
        features = getattr(self.net, "features", None)
        if not isinstance(head, torch.nn.Linear) or not isinstance(features, torch.nn.Module):
            raise TypeError("CAM needs a network with .features and .class_layers.out (MONAI DenseNet)")
        self._features: torch.nn.Module = features
        self._head: torch.nn.Linear = head

    def _batch(self, images: Sequence[NDArray[np.float32]]) -> torch.Tensor:
        tensors = [torch.as_tensor(np.asarray(self.preprocess(img))) for img in images]
        return torch.stack(tensors).float().to(self.device)

    @torch.inference_mode()
    def predict(self, images: Sequence[NDArray[np.float32]]) -> Prediction:
        x = self._batch(images)
        fmap = torch.relu(self._features(x))  # (n, k, h, w)
        pooled = fmap.mean(dim=(2, 3))
        logits = self._head(pooled)
        probs = torch.sigmoid(logits / self.bundle.temperature)
        cams = torch.einsum("ck,nkhw->nchw", self._head.weight, fmap)
        cams = torch.relu(cams)
        peak = cams.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
        cams = cams / peak
        return Prediction(
            probabilities=probs.cpu().numpy().astype(np.float32),
            cams=cams.cpu().numpy().astype(np.float32),
        )
