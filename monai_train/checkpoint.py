"""Checkpoints of a training run: ``last.pt`` (everything an exact resume needs) and ``best.pt`` (the weights
of the best epoch so far), written atomically so a run killed mid-write never leaves a torn file."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("monai_train")


@dataclass
class Optimisation:
    """What a step changes beside the weights; all of it is checkpointed."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler


@dataclass
class Progress:
    """Where a run stands after ``epoch``: the best epoch so far, its weights (on the CPU) and the history."""

    best_state: dict[str, torch.Tensor]
    epoch: int = 0
    best_score: float = -math.inf
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(
    ckpt_dir: Path,
    net: torch.nn.Module,
    opt: Optimisation,
    progress: Progress,
    fingerprint: dict[str, Any],
    *,
    improved: bool,
) -> None:
    if improved:
        atomic_save(progress.best_state, ckpt_dir / "best.pt")
    atomic_save(
        {
            "model": net.state_dict(),
            "optimizer": opt.optimizer.state_dict(),
            "scheduler": opt.scheduler.state_dict(),
            "scaler": opt.scaler.state_dict(),
            "epoch": progress.epoch,
            "best_score": progress.best_score,
            "best_epoch": progress.best_epoch,
            "history": progress.history,
            "fingerprint": fingerprint,
        },
        ckpt_dir / "last.pt",
    )


def resume_checkpoint(
    ckpt_dir: Path,
    net: torch.nn.Module,
    opt: Optimisation,
    fingerprint: dict[str, Any],
    device: torch.device,
) -> Progress | None:
    """Load ``last.pt`` into ``net`` and ``opt``; None when there is none. A checkpoint of another run
    (any fingerprint setting differs) is refused."""
    last = ckpt_dir / "last.pt"
    if not last.is_file():
        log.warning("--resume given but %s does not exist: starting afresh", last)
        return None
    ckpt = torch.load(last, map_location=device, weights_only=False)
    if ckpt["fingerprint"] != fingerprint:
        raise ValueError(
            f"checkpoint {last} was written for a different run "
            f"({ckpt['fingerprint']} != {fingerprint}); start afresh without --resume"
        )
    net.load_state_dict(ckpt["model"])
    opt.optimizer.load_state_dict(ckpt["optimizer"])
    opt.scheduler.load_state_dict(ckpt["scheduler"])
    opt.scaler.load_state_dict(ckpt["scaler"])
    progress = Progress(
        best_state=torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=True),
        epoch=ckpt["epoch"],
        best_score=ckpt["best_score"],
        best_epoch=ckpt["best_epoch"],
        history=ckpt["history"],
    )
    log.info("resumed from %s after epoch %d (best epoch %d)", last, progress.epoch, progress.best_epoch)
    return progress
