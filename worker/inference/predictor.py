"""Probabilities and class-activation maps for every label from one forward pass."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from worker.inference.bundle import ONNX_WEIGHTS as ONNX
from worker.inference.bundle import Bundle


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


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

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        threads: int = 0,
        cam_method: str = "auto",
        backend: str = "auto",
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.device = torch.device(device)
        self.net = bundle.network().to(self.device)
        self.preprocess = bundle.preprocessing()
        head = getattr(getattr(self.net, "class_layers", None), "out", None)
        features = getattr(self.net, "features", None)
        has_cam_head = isinstance(head, torch.nn.Linear) and isinstance(features, torch.nn.Module)
        if cam_method == "auto":
            cam_method = "cam" if has_cam_head else "gradcam"
        self.cam_method = cam_method
        if cam_method == "cam":
            if not has_cam_head:
                raise TypeError("CAM needs a network with .features and .class_layers.out (MONAI DenseNet)")
            assert isinstance(head, torch.nn.Linear) and isinstance(features, torch.nn.Module)
            self._features: torch.nn.Module = features
            self._head: torch.nn.Linear = head
        elif cam_method == "gradcam":
            # Any other network: MONAI Grad-CAM on the layer the bundle names (one backward pass per class).
            from monai.visualize.class_activation_maps import GradCAM

            layer = str(bundle.metadata.get("cam_target_layer", "class_layers.relu"))
            # MONAI's default post-processing maps (min, max) to (1, 0); keep raw magnitudes instead.
            self._gradcam = GradCAM(nn_module=self.net, target_layers=layer, postprocessing=_identity)
        else:
            raise ValueError(f"unknown cam_method {cam_method!r}")
        self.backend = self._choose_backend(backend, device)
        self._session: Any = None
        if self.backend == "onnx":
            import onnxruntime as ort

            options = ort.SessionOptions()
            if threads > 0:
                options.intra_op_num_threads = threads
            self._session = ort.InferenceSession(
                str(bundle.path / ONNX), options, providers=["CPUExecutionProvider"]
            )

    def _choose_backend(self, backend: str, device: str) -> str:
        # ONNX Runtime is the faster CPU path for the CAM graph; torch serves GPUs and Grad-CAM.
        onnx_ok = self.cam_method == "cam" and device == "cpu" and (self.bundle.path / ONNX).is_file()
        if backend == "auto":
            if not onnx_ok:
                return "torch"
            try:
                import onnxruntime  # noqa: F401
            except ImportError:
                return "torch"
            return "onnx"
        if backend == "onnx" and not onnx_ok:
            raise ValueError("the ONNX backend needs models/model.onnx, CAM and the CPU")
        if backend not in {"onnx", "torch"}:
            raise ValueError(f"unknown backend {backend!r}")
        return backend

    def _batch(self, images: Sequence[NDArray[np.float32]]) -> torch.Tensor:
        tensors = [torch.as_tensor(np.asarray(self.preprocess(img))) for img in images]
        return torch.stack(tensors).float().to(self.device)

    def predict(self, images: Sequence[NDArray[np.float32]]) -> Prediction:
        if self.cam_method == "gradcam":
            return self._predict_gradcam(images)
        if self.backend == "onnx":
            return self._predict_onnx(images)
        return self._predict_cam(images)

    def _predict_onnx(self, images: Sequence[NDArray[np.float32]]) -> Prediction:
        x = self._batch(images).numpy()
        logits, cams = self._session.run(None, {"image": x})
        return self._finish(torch.from_numpy(logits), torch.from_numpy(cams))

    def _finish(self, logits: torch.Tensor, cams: torch.Tensor) -> Prediction:
        """Calibrated probabilities and maps scaled to [0, 1]: one definition for every backend."""
        probs = torch.sigmoid(logits / self.bundle.temperature)
        peak = cams.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
        return Prediction(
            probabilities=probs.cpu().numpy().astype(np.float32),
            cams=(cams / peak).cpu().numpy().astype(np.float32),
        )

    def _predict_gradcam(self, images: Sequence[NDArray[np.float32]]) -> Prediction:
        x = self._batch(images)
        with torch.inference_mode():
            logits = self.net(x)
        maps = [self._gradcam(x, class_idx=c)[:, 0] for c in range(logits.shape[1])]  # each (n, H, W)
        return self._finish(logits, torch.relu(torch.stack(maps, dim=1).detach()))

    @torch.inference_mode()
    def _predict_cam(self, images: Sequence[NDArray[np.float32]]) -> Prediction:
        x = self._batch(images)
        fmap = torch.relu(self._features(x))  # (n, k, h, w)
        pooled = fmap.mean(dim=(2, 3))
        logits = self._head(pooled)
        cams = torch.relu(torch.einsum("ck,nkhw->nchw", self._head.weight, fmap))
        return self._finish(logits, cams)
