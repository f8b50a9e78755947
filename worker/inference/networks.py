"""Network definitions a bundle's ``network_def`` may name besides MONAI's own (``_target_`` is a dotted
path, instantiated by MONAI's ConfigParser in the worker and in training alike).

`DenseNet121Fine` is MONAI's DenseNet-121 whose last transitions keep their resolution (their 2 × 2
average pooling removed): with ``pool_free_transitions=(2, 3)`` the final feature map is 1/8 of the input
instead of 1/32, so a 128² input gives 16 × 16 class-activation cells instead of 4 × 4. The weights have
the same names and shapes as `monai.networks.nets.DenseNet121`'s (pooling has none).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from monai.networks.nets.densenet import DenseNet121

__all__ = ["DenseNet121Fine", "feature_stride"]


class DenseNet121Fine(DenseNet121):  # type: ignore[misc]  # MONAI's classes are untyped for mypy
    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        pool_free_transitions: Sequence[int] = (2, 3),
        **kwargs: Any,
    ) -> None:
        super().__init__(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels, **kwargs
        )
        for index in pool_free_transitions:
            if index not in (1, 2, 3):
                raise ValueError(f"DenseNet-121 has transitions 1, 2 and 3, not {index}")
            getattr(self.features, f"transition{index}").pool = torch.nn.Identity()
        self.pool_free_transitions = tuple(int(i) for i in pool_free_transitions)


def feature_stride(pool_free_transitions: Sequence[int]) -> int:
    """Input pixels per feature-map cell: 32 for DenseNet-121, halved for each transition kept pool-free."""
    return int(32 // (2 ** len(set(pool_free_transitions))))
