"""Training losses: class-weighted BCE (or its focal form) on multi-hot labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from monai_train.data import Record

LOSSES = ("bce", "focal")


def positive_weights(records: Sequence[Record], n_labels: int, max_weight: float) -> torch.Tensor:
    """neg/pos per label from the training prevalence, clipped to [1, max_weight]."""
    y = np.asarray([r.labels for r in records], dtype=np.float64).reshape(-1, n_labels)
    pos = y.sum(axis=0)
    neg = y.shape[0] - pos
    w = np.where(pos > 0, neg / np.maximum(pos, 1), max_weight)
    return torch.as_tensor(np.clip(w, 1.0, max_weight), dtype=torch.float32)


def multilabel_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    pos_weight: torch.Tensor,
    kind: str = "bce",
    gamma: float = 2.0,
) -> torch.Tensor:
    """Class-weighted BCE, or its focal form: the same terms scaled by (1 − p_t)^γ (Lin et al. 2017)."""
    logits = logits.float()  # loss in fp32 also under autocast
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
        logits, target, pos_weight=pos_weight, reduction="none"
    )
    if kind == "focal":
        p = torch.sigmoid(logits)
        p_t = p * target + (1 - p) * (1 - target)
        bce = bce * (1 - p_t).pow(gamma)
    elif kind != "bce":
        raise ValueError(f"loss must be one of {LOSSES}")
    return bce.mean()


def distillation_loss(logits: torch.Tensor, soft: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """BCE towards a reference's probabilities (soft targets), averaged over the rows that have them
    (``mask`` 1); 0 for a batch without any. Unweighted: the reference's probabilities already carry its
    prevalence, and AUROC only needs the ranking it teaches."""
    rows = mask > 0
    if not bool(rows.any()):
        return logits.sum() * 0.0
    return torch.nn.functional.binary_cross_entropy_with_logits(logits.float()[rows], soft[rows])
