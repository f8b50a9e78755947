"""The training loop: streamed batches from the disk cache, augmented on the training device, AdamW with a
one-cycle LR, AMP on CUDA, DDP under torchrun, validation each epoch (best epoch by validation mean AUROC,
else validation loss), TensorBoard and a progress bar, a checkpoint each epoch."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from torch.utils.data import DataLoader

from monai_train.cache import (
    CachedImages,
    augment_batch,
    cache_dir_for,
    cache_splits,
    simulate_low_resolution,
)
from monai_train.checkpoint import Optimisation, Progress, resume_checkpoint, save_checkpoint
from monai_train.config import TrainConfig, fingerprint
from monai_train.data import Splits, data_summary
from monai_train.distributed import barrier, init_distributed, training_device
from monai_train.losses import distillation_loss, multilabel_loss, positive_weights
from monai_train.metrics import compute_metrics
from monai_train.network import head
from monai_train.reference import read_reference

log = logging.getLogger("monai_train")


@dataclass
class Datasets:
    train: CachedImages
    val: CachedImages
    test: CachedImages


@dataclass
class Step:
    """What one training step needs beside the batch."""

    model: torch.nn.Module  # the network, or its DDP wrapper
    opt: Optimisation
    pos_weight: torch.Tensor
    device: torch.device
    amp_dtype: torch.dtype | None  # None: no autocast


def _tensor(x: Any) -> torch.Tensor:
    # MONAI's random transforms return MetaTensors; the network needs none of the metadata.
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


def sigmoid(z: npt.ArrayLike) -> npt.NDArray[np.float32]:
    return (1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))).astype(np.float32)


@torch.inference_mode()
def predict_logits(
    net: torch.nn.Module, dataset: CachedImages, batch_size: int, device: torch.device
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], list[str]]:
    """(logits, labels, names) in dataset order, network in eval mode, fp32."""
    net.eval()
    logits, ys, names = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        logits.append(net(_tensor(batch["image"]).to(device)).float().cpu().numpy())
        ys.append(_tensor(batch["label"]).numpy())
        names.extend(batch["name"])
    n_labels = int(head(net).out_features)
    if not logits:
        return np.zeros((0, n_labels), np.float32), np.zeros((0, n_labels), np.float32), []
    return np.concatenate(logits), np.concatenate(ys), names


def _progress(loader: DataLoader[Any], desc: str, enabled: bool) -> Iterator[Any]:
    """A live bar with rate and ETA on a terminal (tqdm); log lines do the job elsewhere."""
    if not enabled:
        yield from loader
        return
    from tqdm import tqdm

    yield from tqdm(loader, desc=desc, leave=False, unit="batch", dynamic_ncols=True)


def _tensorboard(tc: TrainConfig) -> Any:
    """A TensorBoard SummaryWriter under <checkpoint_dir>/tensorboard (``tensorboard --logdir`` there)."""
    if not tc.tensorboard or tc.checkpoint_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # declared in the train extra; a bare install still trains
        log.warning("tensorboard is not installed (pip install 'cxr-gateway[train]'): no event files")
        return None

    return SummaryWriter(log_dir=str(tc.checkpoint_dir / "tensorboard"))


def cached_datasets(splits: Splits, cfg: dict[str, Any], tc: TrainConfig) -> tuple[Splits, Datasets]:
    t0 = time.monotonic()
    splits, report = cache_splits(splits, cfg, tc)
    cache = cache_dir_for(tc)
    soft = _soft_targets(tc)
    # Soft targets for training images only: validation selects and test measures on the labels alone.
    ds = Datasets(
        CachedImages(splits.train, cfg, cache, soft),
        CachedImages(splits.val, cfg, cache),
        CachedImages(splits.test, cfg, cache),
    )
    if soft:
        log.info(
            "distillation: %d of %d training images have the reference's probabilities as soft targets "
            "(weight %g)",
            sum(r.name in soft for r in splits.train),
            len(splits.train),
            tc.distill_weight,
        )
    sizes = "/".join(str(len(d)) for d in (ds.train, ds.val, ds.test))
    log.info(
        "%s preprocessed images in the disk cache %s (%d built now, %.1fs)",
        sizes,
        cache,
        report.built,
        time.monotonic() - t0,
    )
    if not len(ds.train):
        raise ValueError(f"no readable training image (skipped: {report.skipped})")
    return splits, ds


def _soft_targets(tc: TrainConfig) -> dict[str, Any]:
    if tc.distill_weight <= 0:
        return {}
    if tc.reference_predictions is None:
        raise ValueError("distillation needs --reference-predictions (the soft targets)")
    return dict(read_reference(tc.reference_predictions, tc.labels))


def _loader(
    train_ds: CachedImages, tc: TrainConfig, rank: int, world: int, device: torch.device
) -> tuple[DataLoader[Any], torch.Generator, Any]:
    """(loader, its shuffling generator, the DDP sampler or None): under DDP each process takes its share of
    every epoch's shuffled order (the sampler is seeded per epoch)."""
    generator = torch.Generator().manual_seed(tc.seed)
    sampler: torch.utils.data.DistributedSampler[Any] | None = (
        torch.utils.data.DistributedSampler(
            train_ds, num_replicas=world, rank=rank, shuffle=True, seed=tc.seed
        )
        if world > 1
        else None
    )
    loader = DataLoader(
        train_ds,
        batch_size=tc.batch_size,
        shuffle=sampler is None,
        sampler=sampler,
        num_workers=tc.workers,
        drop_last=False,
        generator=generator,
        pin_memory=device.type == "cuda",
        persistent_workers=tc.workers > 0,
    )
    return loader, generator, sampler


def _optimisation(
    net: torch.nn.Module, tc: TrainConfig, total_steps: int, device: torch.device, fp16: bool
) -> Optimisation:
    optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tc.lr, total_steps=total_steps)
    return Optimisation(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=fp16))


def _step(step: Step, x: torch.Tensor, batch: dict[str, Any], tc: TrainConfig) -> float:
    opt = step.opt
    opt.optimizer.zero_grad(set_to_none=True)
    dtype = step.amp_dtype or torch.float32
    with torch.autocast(device_type=step.device.type, dtype=dtype, enabled=step.amp_dtype is not None):
        logits = step.model(x)
    y = _tensor(batch["label"]).to(step.device, non_blocking=True)
    loss = multilabel_loss(logits, y, step.pos_weight, tc.loss, tc.focal_gamma)
    if tc.distill_weight > 0:
        soft, mask = (_tensor(batch[k]).to(step.device) for k in ("soft", "soft_mask"))
        loss = loss + tc.distill_weight * distillation_loss(logits, soft, mask)
    opt.scaler.scale(loss).backward()
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.scheduler.step()
    return float(loss.detach())


def train_epoch(
    step: Step,
    loader: DataLoader[Any],
    epoch: int,
    tc: TrainConfig,
    aug_gen: torch.Generator,
    writer: Any,
    rank: int,
) -> float:
    """One pass over the loader; the mean training loss."""
    step.model.train()
    t_epoch, running, seen = time.monotonic(), 0.0, 0
    show_bar = tc.log_every > 0 and sys.stderr.isatty() and rank == 0
    for i, batch in enumerate(_progress(loader, f"epoch {epoch}/{tc.epochs}", show_bar), start=1):
        x = _tensor(batch["image"]).to(step.device, non_blocking=True)
        if tc.low_res:
            x = simulate_low_resolution(x, tc.low_res, tc.low_res_prob, aug_gen)
        if tc.augment:
            x = augment_batch(x, aug_gen)
        loss = _step(step, x, batch, tc)
        running += loss * x.shape[0]
        seen += x.shape[0]
        lr = step.opt.scheduler.get_last_lr()[0]
        if writer is not None:
            writer.add_scalar("train/loss", loss, (epoch - 1) * len(loader) + i)
            writer.add_scalar("train/lr", lr, (epoch - 1) * len(loader) + i)
        if tc.log_every and (i % tc.log_every == 0 or i == len(loader)):
            rate = seen / max(time.monotonic() - t_epoch, 1e-9)
            log.info(
                "epoch %d/%d step %d/%d loss %.4f lr %.2e %.1f img/s",
                *(epoch, tc.epochs, i, len(loader), running / seen, lr, rate),
            )
    return running / max(seen, 1)


def validate(
    net: torch.nn.Module, val_ds: CachedImages, step: Step, tc: TrainConfig
) -> tuple[float, float | None]:
    """(validation loss, validation mean AUROC or None where undefined)."""
    val_logits, val_y, _ = predict_logits(net, val_ds, tc.batch_size, step.device)
    if not len(val_y):
        return math.nan, None
    loss = multilabel_loss(
        torch.as_tensor(val_logits), torch.as_tensor(val_y), step.pos_weight.cpu(), tc.loss, tc.focal_gamma
    )
    return float(loss), compute_metrics(val_y, sigmoid(val_logits), tc.labels)["mean_auroc"]


def _record_epoch(
    progress: Progress, net: torch.nn.Module, row: dict[str, Any], writer: Any, tc: TrainConfig
) -> bool:
    """Add the epoch to the history, keep the weights when it is the best so far; True when it was."""
    val_loss, val_auroc, train_loss = row["val_loss"], row["val_mean_auroc"], row["train_loss"]
    # Select by validation mean AUROC; where it is undefined (tiny validation sets), by val loss.
    score = val_auroc if val_auroc is not None else (-val_loss if math.isfinite(val_loss) else -train_loss)
    improved = bool(score > progress.best_score)
    if improved:
        progress.best_score, progress.best_epoch = score, row["epoch"]
        progress.best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
    progress.epoch = row["epoch"]
    progress.history.append(
        {**row, "val_loss": val_loss if math.isfinite(val_loss) else None}
    )  # no NaN in JSON
    auroc_text = "n/a" if val_auroc is None else f"{val_auroc:.4f}"
    log.info(
        "epoch %d/%d done in %.0fs: train loss %.4f, val loss %.4f, val mean AUROC %s%s",
        *(
            row["epoch"],
            tc.epochs,
            row["seconds"],
            train_loss,
            val_loss,
            auroc_text,
            " (best)" if improved else "",
        ),
    )
    if writer is not None:
        for key in ("train_loss", "val_loss", "val_mean_auroc"):
            value = row[key]
            if value is not None and math.isfinite(value):
                writer.add_scalar(f"epoch/{key}", value, row["epoch"])
        writer.flush()
    return improved


def fit(
    net: torch.nn.Module, splits: Splits, cfg: dict[str, Any], tc: TrainConfig
) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]], CachedImages, CachedImages]:
    """Train; returns (best state, best epoch, history, val dataset, test dataset)."""
    device = training_device(tc.device)
    rank, world = init_distributed(device.type)
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    splits, ds = cached_datasets(splits, cfg, tc)
    loader, generator, sampler = _loader(ds.train, tc, rank, world, device)
    net.to(device)
    model: torch.nn.Module = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
        log.info("DDP: rank %d of %d, %d training batches per process per epoch", rank, world, len(loader))
    # bf16 where the GPU has it (no loss scaling needed), else fp16 with a GradScaler.
    amp_dtype = (
        None
        if device.type != "cuda"
        else (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    )
    total_steps = max(1, len(loader) * tc.epochs)
    opt = _optimisation(net, tc, total_steps, device, fp16=amp_dtype == torch.float16)
    step = Step(
        model,
        opt,
        positive_weights(splits.train, len(tc.labels), tc.pos_weight_max).to(device),
        device,
        amp_dtype,
    )
    # A checkpoint only resumes the same run: same labels, size, schedule and training images.
    shas = (str(data_summary(recs, tc.labels)["sha256"]) for recs in (splits.train, splits.val))
    run_id = {**fingerprint(tc, total_steps, *shas), "world_size": world}
    progress = _start(net, opt, run_id, tc, device)
    writer = _tensorboard(tc) if rank == 0 else None
    aug_gen = torch.Generator()
    for epoch in range(progress.epoch + 1, min(tc.epochs, tc.stop_after or tc.epochs) + 1):
        # Shuffling and augmentation are seeded per epoch, so a resumed run draws exactly what an
        # uninterrupted one would have drawn.
        generator.manual_seed(tc.seed * 100_003 + epoch)
        aug_gen.manual_seed(tc.seed * 100_003 + epoch + 7919 + 1_000_003 * rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
        t_epoch = time.monotonic()
        train_loss = train_epoch(step, loader, epoch, tc, aug_gen, writer, rank)
        val_loss, val_auroc = validate(net, ds.val, step, tc)
        row = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "val_mean_auroc": val_auroc}
        improved = _record_epoch(progress, net, {**row, "seconds": time.monotonic() - t_epoch}, writer, tc)
        if tc.checkpoint_dir is not None and rank == 0:
            save_checkpoint(tc.checkpoint_dir, net, opt, progress, run_id, improved=improved)
    if writer is not None:
        writer.close()
    barrier()  # every process has finished; rank 0's checkpoints are on disk
    return progress.best_state, progress.best_epoch, progress.history, ds.val, ds.test


def _start(
    net: torch.nn.Module, opt: Optimisation, run_id: dict[str, Any], tc: TrainConfig, device: torch.device
) -> Progress:
    """A fresh run's progress, or the checkpoint's with ``resume``."""
    if tc.checkpoint_dir is not None:
        tc.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        if tc.resume:
            resumed = resume_checkpoint(tc.checkpoint_dir, net, opt, run_id, device)
            if resumed is not None:
                return resumed
    return Progress(best_state={k: v.detach().clone() for k, v in net.state_dict().items()})
