"""DDP under ``torchrun``: which process this is, the process group, and the device each process trains on."""

from __future__ import annotations

import os

import torch

from worker.inference.predictor import resolve_device


def distributed() -> bool:
    """True under ``torchrun`` with more than one process (WORLD_SIZE > 1)."""
    return torch.distributed.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def training_device(name: str) -> torch.device:
    """The worker's device choice (``auto``: CUDA when there is one), one GPU per torchrun process."""
    device = resolve_device(name)
    if device.type == "cuda" and device.index is None and distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(device_type: str) -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes (NCCL on GPUs, gloo on CPUs)."""
    if not distributed():
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def barrier() -> None:
    if distributed() and torch.distributed.is_initialized():
        torch.distributed.barrier()
