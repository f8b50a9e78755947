"""Class-activation maps for every label from one forward pass: one module for torch and ONNX export."""

from __future__ import annotations

import torch


class CamNetwork(torch.nn.Module):
    """(image) -> (logits, raw class-activation maps), for a features + linear-head network.

    For a global-pooling + linear head (DenseNet), the activation map of class c is the head's weights
    for c applied to the final feature map, so all classes' maps cost one forward pass and one einsum,
    not one backward pass per class as Grad-CAM would.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
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
        cams = torch.relu(torch.einsum("ck,nkhw->nchw", self.head.weight, fmap))
        return logits, cams
