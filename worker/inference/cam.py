"""Class-activation maps for every label from one forward pass: one module for torch and ONNX export.

Two explanation methods, both exact for a global-average-pooling + linear head and both without a
backward pass:

- CAM (Zhou et al. 2016): map_c = relu(Σ_k w_ck · A_k).
- Grad-CAM++ (Chattopadhyay et al. 2018): with S_c = Σ_k w_ck · mean(A_k) the gradient dS_c/dA_k is the
  constant w_ck / HW and its higher derivatives vanish, so the method's pixel weights reduce to
  α_ck = 1 / (2 + w_ck · mean(A_k)) and map_c = relu(Σ_k α_ck · relu(w_ck) · A_k), up to the per-class
  factor exp(S_c) that the [0, 1] scaling removes. It weighs only channels that raise the score, and
  down-weights channels that are strongly on everywhere. ``tests/unit/inference`` checks it against MONAI's
  ``GradCAMpp`` (backward passes).
"""

from __future__ import annotations

import torch


class CamNetwork(torch.nn.Module):
    """(image) -> (logits, raw class-activation maps), for a features + linear-head network.

    For a global-pooling + linear head (DenseNet), the activation map of class c is the head's weights
    for c applied to the final feature map, so all classes' maps cost one forward pass and one einsum,
    not one backward pass per class as Grad-CAM would.
    """

    METHODS = ("cam", "gradcam++")

    def __init__(self, net: torch.nn.Module, method: str = "cam") -> None:
        super().__init__()
        if method not in self.METHODS:
            raise ValueError(f"unknown CAM method {method!r} (known: {self.METHODS})")
        self.method = method
        head = getattr(getattr(net, "class_layers", None), "out", None)
        features = getattr(net, "features", None)
        if not isinstance(head, torch.nn.Linear) or not isinstance(features, torch.nn.Module):
            raise TypeError("CAM needs a network with .features and .class_layers.out (MONAI DenseNet)")
        self.features = features
        self.head = head

    @staticmethod
    def supports(net: torch.nn.Module) -> bool:
        head = getattr(getattr(net, "class_layers", None), "out", None)
        return isinstance(head, torch.nn.Linear) and isinstance(
            getattr(net, "features", None), torch.nn.Module
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = torch.relu(self.features(x))
        logits = self.head(fmap.mean(dim=(2, 3)))
        if self.method == "cam":
            return logits, torch.relu(torch.einsum("ck,nkhw->nchw", self.head.weight, fmap))
        w = self.head.weight  # (c, k)
        alpha = 1.0 / (2.0 + w[None] * fmap.mean(dim=(2, 3))[:, None])  # (n, c, k); > 0 where w > 0
        weights = alpha * torch.relu(w)[None]
        return logits, torch.relu(torch.einsum("nck,nkhw->nchw", weights, fmap))
