"""Probabilities and class-activation maps for every label from one forward pass.

Two steps, so that a batcher can put them in different threads: ``prepare`` (the bundle's preprocessing,
on the CPU, per image) and ``run`` (one forward pass over a stacked batch, on the chosen device).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from worker.inference.bundle import INT8_WEIGHTS as INT8
from worker.inference.bundle import ONNX_WEIGHTS as ONNX
from worker.inference.bundle import Bundle
from worker.inference.cam import CamNetwork


class Precision(StrEnum):
    # bf16 on a GPU that has it, else fp16 on a GPU; on the CPU int8 when the bundle ships its checked
    # int8 graph (models/model.int8.onnx), else fp32
    AUTO = "auto"
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    INT8 = "int8"  # the CPU only, ONNX Runtime: the bundle's int8 graph


class Backend(StrEnum):
    AUTO = "auto"  # ONNX Runtime on the CPU when the bundle ships model.onnx, else torch
    TORCH = "torch"
    ONNX = "onnx"


_DTYPES = {Precision.BF16: torch.bfloat16, Precision.FP16: torch.float16}


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def resolve_device(name: str) -> torch.device:
    """``auto``: the first CUDA device when there is one, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"inference device {name!r} asked for, but torch sees no CUDA device")
    return device


def resolve_precision(precision: Precision | str, device: torch.device, int8: bool = False) -> Precision:
    """``auto``: see :class:`Precision`; ``int8``: whether the bundle ships its int8 graph."""
    precision = Precision(precision)
    if precision != Precision.AUTO:
        return precision
    if device.type != "cuda":
        return Precision.INT8 if int8 and _onnxruntime_present() else Precision.FP32
    return Precision.BF16 if torch.cuda.is_bf16_supported() else Precision.FP16


@dataclass(frozen=True)
class Prediction:
    probabilities: NDArray[np.float32]  # (n_images, n_labels): Bundle.probabilities of the logits
    cams: NDArray[np.float32]  # (n_images, n_labels, h, w), each map scaled to [0, 1]
    # The forward pass(es) that produced this: how many images, from how many callers (studies).
    batch_images: int = 0
    batch_requests: int = 1


class Predictor:
    """Runs a bundle's network on display images (float32 2-D arrays in [0, 1], MONOCHROME2 sense).

    On a GPU the forward pass runs under autocast (bf16 or fp16) in channels-last layout; probabilities
    and maps are computed in fp32 from its outputs either way.
    """

    def __init__(
        self,
        bundle: Bundle,
        device: str = "cpu",
        threads: int = 0,
        cam_method: str = "auto",
        backend: Backend | str = Backend.AUTO,
        precision: Precision | str = Precision.AUTO,
    ) -> None:
        if threads > 0:
            torch.set_num_threads(threads)
        self.bundle = bundle
        self.device = resolve_device(device)
        self.net = bundle.network().to(self.device)
        self.preprocess = bundle.preprocessing()
        has_cam_head = CamNetwork.supports(self.net)
        if cam_method == "auto":
            cam_method = "cam" if has_cam_head else "gradcam"
        self.cam_method = cam_method
        if cam_method in CamNetwork.METHODS:
            self._cam_net = CamNetwork(self.net, cam_method).eval()
        elif cam_method == "gradcam":
            # Any other network: MONAI Grad-CAM on the layer the bundle names (one backward pass per class).
            from monai.visualize.class_activation_maps import GradCAM

            layer = str(bundle.metadata.get("cam_target_layer", "class_layers.relu"))
            # MONAI's default post-processing maps (min, max) to (1, 0); keep raw magnitudes instead.
            self._gradcam = GradCAM(nn_module=self.net, target_layers=layer, postprocessing=_identity)
        else:
            raise ValueError(f"unknown cam_method {cam_method!r}")
        backend = Backend(backend)
        # Chosen by itself only when checked: the graph and its check's report in metadata (quantize writes
        # the report last, so a run that died half-way leaves an unchecked graph that auto does not pick).
        int8 = (
            cam_method == "cam"
            and backend != Backend.TORCH
            and (bundle.path / INT8).is_file()
            and "int8" in bundle.metadata
        )
        self.precision = resolve_precision(precision, self.device, int8=int8)
        self.backend = self._choose_backend(backend)
        self._session: Any = None
        if self.backend == Backend.ONNX:
            ort = _onnxruntime()
            options = ort.SessionOptions()
            if threads > 0:
                options.intra_op_num_threads = threads
            graph = INT8 if self.precision == Precision.INT8 else ONNX
            self._session = ort.InferenceSession(
                str(bundle.path / graph), options, providers=["CPUExecutionProvider"]
            )
        if self.device.type == "cuda":
            # Fixed input size: let cuDNN pick its fastest kernels once.
            torch.backends.cudnn.benchmark = True
            self.net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]

    def _choose_backend(self, backend: Backend) -> Backend:
        # ONNX Runtime is the faster CPU path for the CAM graph (measured in bench/inference_bench.py);
        # torch serves GPUs, Grad-CAM and reduced precision.
        onnx_ok = (
            self.cam_method == "cam"
            and self.device.type == "cpu"
            and self.precision in (Precision.FP32, Precision.INT8)
            and (self.bundle.path / (INT8 if self.precision == Precision.INT8 else ONNX)).is_file()
        )
        if self.precision == Precision.INT8 and (backend == Backend.TORCH or not onnx_ok):
            raise ValueError("int8 needs the bundle's models/model.int8.onnx, CAM, the CPU and ONNX Runtime")
        if backend == Backend.AUTO:
            return Backend.ONNX if onnx_ok and _onnxruntime_present() else Backend.TORCH
        if backend == Backend.ONNX and not onnx_ok:
            raise ValueError("the ONNX backend needs models/model.onnx, CAM, the CPU and fp32 (or int8)")
        return backend

    @property
    def description(self) -> dict[str, str]:
        """What ran, for the job's result (and so for whoever audits a finding)."""
        return {"device": self.device.type, "precision": self.precision.value, "backend": self.backend.value}

    def prepare(self, images: Sequence[NDArray[np.float32]]) -> torch.Tensor:
        """The bundle's preprocessing, stacked into one float32 CPU batch (n, 1, H, W)."""
        tensors = [torch.as_tensor(np.asarray(self.preprocess(img))) for img in images]
        return torch.stack(tensors).float()

    def predict(self, images: Sequence[NDArray[np.float32]]) -> Prediction:
        return self.run(self.prepare(images))

    def run(self, x: torch.Tensor) -> Prediction:
        """One forward pass over a prepared batch."""
        if self.cam_method == "gradcam":
            return self._run_gradcam(x)
        if self.backend == Backend.ONNX:
            logits, cams = self._session.run(None, {"image": x.numpy()})
            return self._finish(torch.from_numpy(logits), torch.from_numpy(cams))
        return self._run_cam(x)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        dtype = _DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def _to_device(self, x: torch.Tensor) -> torch.Tensor:
        if self.device.type != "cuda":
            return x
        return x.pin_memory().to(self.device, non_blocking=True).contiguous(memory_format=torch.channels_last)

    @torch.inference_mode()
    def _run_cam(self, x: torch.Tensor) -> Prediction:
        with self._autocast():
            logits, cams = self._cam_net(self._to_device(x))
        return self._finish(logits, cams)

    def _run_gradcam(self, x: torch.Tensor) -> Prediction:
        x = self._to_device(x)
        with torch.inference_mode():
            logits = self.net(x)
        maps = [self._gradcam(x, class_idx=c)[:, 0] for c in range(logits.shape[1])]  # each (n, H, W)
        return self._finish(logits, torch.relu(torch.stack(maps, dim=1).detach()))

    def _finish(self, logits: torch.Tensor, cams: torch.Tensor) -> Prediction:
        """Calibrated probabilities and maps scaled to [0, 1]: one definition for every backend."""
        logits, cams = logits.float(), cams.float()
        # The bundle's calibration (worker.inference.calibration), the one training's evaluation uses too.
        probs = self.bundle.probabilities(logits.detach().cpu().numpy())
        peak = cams.amax(dim=(2, 3), keepdim=True).clamp_min(1e-8)
        return Prediction(
            probabilities=probs,
            cams=(cams / peak).cpu().numpy().astype(np.float32),
            batch_images=int(logits.shape[0]),
        )


def _onnxruntime_present() -> bool:
    try:
        _onnxruntime()
    except ImportError:
        return False
    return True


def _onnxruntime() -> Any:
    """The onnxruntime module, imported with its telemetry off: on import it would otherwise write a
    device id and a telemetry database under ~/.cache and a file under $TMPDIR (worker.confine does the
    same for the worker process; this covers every other user of the predictor)."""
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    import onnxruntime

    return onnxruntime
