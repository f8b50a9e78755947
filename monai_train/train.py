"""Training a MONAI DenseNet-121 bundle: the same preprocessing the worker runs, then calibration and export.

Flow: records → patient-wise splits → disk cache (the worker's rendering + the bundle's preprocessing, once
per image, multi-process; unreadable images skipped and counted) → streamed batches, augmented as whole
batches on the training device (train only) → class-weighted BCE (or focal) with AdamW
and a one-cycle LR → best epoch by validation mean AUROC → temperature on validation logits →
per-label operating points on calibrated validation probabilities → metrics on the held-out test split
→ ``export_bundle``.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
from monai.transforms import MapTransform
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from monai_train.bundle import (
    NIH_LABELS,
    build_network,
    export_bundle,
    inference_config,
)
from monai_train.cache import Augmentation, CachedImages, CacheReport, augment_batch, build_cache
from monai_train.calibrate import fit_platt
from monai_train.data import LeakageError, Record, Splits, check_no_leakage, data_summary, load_image
from monai_train.metrics import (
    choose_operating_points,
    compute_metrics,
    fit_temperature,
    write_curves,
)
from worker.inference.calibration import Calibration

log = logging.getLogger("monai_train")

LOSSES = ("bce", "focal")
SPLITS_FILE = "splits.csv"


class TrainingStopped(RuntimeError):
    """``stop_after`` ended the run early; its checkpoint continues it with ``resume=True``."""


@dataclass
class TrainConfig:
    labels: tuple[str, ...] = NIH_LABELS
    image_size: int = 224
    feature_stride: int = 32  # 8: 16 × 16 CAM cells at 128² (worker.inference.networks.DenseNet121Fine)
    histogram_equalise: bool = False  # per-image histogram equalisation in the bundle's preprocessing
    epochs: int = 10
    batch_size: int = 16
    lr: float = 1e-3  # one-cycle peak
    weight_decay: float = 1e-4
    loss: str = "bce"
    focal_gamma: float = 2.0
    pos_weight_max: float = 20.0  # clip: a label with 1 positive in 1000 must not dominate the loss
    augment: bool = True
    seed: int = 0
    operating_point: str = "f1"
    log_every: int = 20
    device: str = "auto"
    checkpoint_dir: Path | None = None
    resume: bool = False
    name: str = "cxr14_densenet121"
    version: str = "0.1.0"
    fp16_export: bool = True
    reference_predictions: Path | None = None
    notes: str = ""
    init_from: Path | None = None  # fine-tuning: bundle the network starts from
    stop_after: int | None = None  # stop after this epoch (time-boxed jobs); continue with resume=True
    cache_dir: Path | None = None  # preprocessed images (default: <checkpoint_dir>/cache)
    workers: int = 0  # processes decoding into the cache and DataLoader workers reading it
    tensorboard: bool = True  # event files under <checkpoint_dir>/tensorboard
    input_report: dict[str, Any] = field(default_factory=dict)  # DICOM folders: gate decisions per folder


@dataclass
class TrainResult:
    bundle: Path
    history: list[dict[str, Any]]
    best_epoch: int
    temperature: float
    operating_points: dict[str, float]
    metrics: dict[str, Any]
    test_names: list[str]
    test_probabilities: npt.NDArray[np.float32]
    extra: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------- data


class LoadPreprocessd(MapTransform):
    """Path → display image → the bundle's preprocessing, built as the worker's Predictor builds it
    (``torch.as_tensor(np.asarray(pre(img)))``): what the disk cache stores for each image."""

    def __init__(self, preprocessing: Any, key: str = "image") -> None:
        super().__init__([key])
        self.preprocessing = preprocessing
        self.key = key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        img = load_image(d[self.key])
        d[self.key] = torch.as_tensor(np.asarray(self.preprocessing(img))).float()
        return d


def cache_dir_for(tc: TrainConfig) -> Path:
    if tc.cache_dir is not None:
        return tc.cache_dir
    if tc.checkpoint_dir is not None:
        return tc.checkpoint_dir / "cache"
    return Path(tempfile.gettempdir()) / "monai_train-cache"


def cache_splits(splits: Splits, cfg: dict[str, Any], tc: TrainConfig) -> tuple[Splits, CacheReport]:
    """Preprocess every image of every split into the disk cache (once); the splits without the images
    that could not be read (counted per reason in the report, never fatal)."""
    rank, _ = init_distributed(resolve_device(tc.device).type)
    records = [*splits.train, *splits.val, *splits.test]
    if rank != 0:
        _barrier()  # rank 0 preprocesses; the others then find every image cached
    report = build_cache(records, cfg, cache_dir_for(tc), workers=tc.workers)
    if rank == 0:
        _barrier()
    kept = {str(r.image) for r in report.records}
    filtered = Splits(
        train=[r for r in splits.train if str(r.image) in kept],
        val=[r for r in splits.val if str(r.image) in kept],
        test=[r for r in splits.test if str(r.image) in kept],
    )
    return filtered, report


def _tensor(x: Any) -> torch.Tensor:
    # MONAI's random transforms return MetaTensors; the network needs none of the metadata.
    return x.as_tensor() if hasattr(x, "as_tensor") else torch.as_tensor(x)


# ---------------------------------------------------------------------------------------------- loss


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


# ---------------------------------------------------------------------------------------------- network


def load_bundle_network(bundle_dir: Path) -> tuple[torch.nn.Module, dict[str, Any], dict[str, Any]]:
    """(network with weights in fp32, inference config, metadata) of a bundle written by export_bundle."""
    cfg = json.loads((bundle_dir / "configs" / "inference.json").read_text())
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    net = build_network(cfg)
    state = load_file(str(bundle_dir / "models" / "model.safetensors"))
    net.load_state_dict({k: v.float() for k, v in state.items()})
    return net, cfg, meta


def head(net: torch.nn.Module) -> torch.nn.Linear:
    out = getattr(getattr(net, "class_layers", None), "out", None)
    if not isinstance(out, torch.nn.Linear):
        raise TypeError("expected a MONAI DenseNet with class_layers.out")
    return out


def init_from_bundle(
    bundle_dir: Path, labels: Sequence[str], image_size: int | None = None
) -> tuple[torch.nn.Module, dict[str, Any], list[str]]:
    """A network for ``labels`` that starts from a bundle's weights.

    The backbone is copied whole; the final Linear keeps the rows (weights and bias) of labels present in
    both label sets and leaves the others at their fresh initialisation. Returns the shared labels.
    """
    old_net, old_cfg, meta = load_bundle_network(bundle_dir)
    old_labels = list(meta["labels"])
    cfg = inference_config(len(labels), image_size or int(old_cfg.get("image_size", 224)))
    cfg["network_def"] = {**old_cfg["network_def"], "out_channels": "@num_classes"}
    cfg["preprocessing"] = old_cfg["preprocessing"]
    net = build_network(cfg)
    old_state = old_net.state_dict()
    new_head, old_head = head(net), head(old_net)
    head_keys = {f"class_layers.out.{k}" for k in ("weight", "bias")}
    net.load_state_dict({k: v for k, v in old_state.items() if k not in head_keys}, strict=False)
    shared = [lb for lb in labels if lb in old_labels]
    with torch.no_grad():
        for lb in shared:
            i, j = list(labels).index(lb), old_labels.index(lb)
            new_head.weight[i] = old_head.weight[j]
            new_head.bias[i] = old_head.bias[j]
    return net, cfg, shared


def check_finetune_leakage(source_bundle: Path, splits: Splits) -> None:
    """A patient the source bundle learned from (train/val) must not be in the new test split: the
    fine-tuned model inherits that knowledge, so its test metrics would be inflated."""
    path = source_bundle / "docs" / SPLITS_FILE
    if not path.is_file():
        log.warning(
            "%s has no %s: cannot check fine-tuning against its training patients", source_bundle, SPLITS_FILE
        )
        return
    with path.open(newline="") as fh:
        learned = {row["Patient ID"] for row in csv.DictReader(fh) if row["split"] in {"train", "val"}}
    leaked = sorted({r.patient_id for r in splits.test} & learned)
    if leaked:
        raise LeakageError(
            f"patient leakage: {len(leaked)} patients of the new test split were in {source_bundle}'s "
            f"training/validation data (e.g. {', '.join(leaked[:5])}); split so that they stay out of test"
        )


# ---------------------------------------------------------------------------------------------- loops


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None and distributed():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))  # one GPU per torchrun process
    return device


# ---------------------------------------------------------------------------------------------- DDP


def distributed() -> bool:
    """True under ``torchrun`` with more than one process (WORLD_SIZE > 1)."""
    return torch.distributed.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device_type: str) -> tuple[int, int]:
    """(rank, world size); joins the process group torchrun describes (NCCL on GPUs, gloo on CPUs)."""
    if not distributed():
        return 0, 1
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def _barrier() -> None:
    if distributed() and torch.distributed.is_initialized():
        torch.distributed.barrier()


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


def sigmoid(z: npt.ArrayLike) -> npt.NDArray[np.float32]:
    return (1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))).astype(np.float32)


def _progress(loader: DataLoader, desc: str, enabled: bool) -> Iterator[Any]:
    """A live bar with rate and ETA on a terminal (tqdm); log lines do the job elsewhere."""
    if not enabled:
        yield from loader
        return
    from tqdm import tqdm

    yield from tqdm(loader, desc=desc, leave=False, unit="batch", dynamic_ncols=True)


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# Settings that change what a run computes: a checkpoint resumes only a run with all of them equal.
# (Logging, device, paths, naming, export precision and post-training choices may differ.)
_RUN_SETTINGS = (
    "labels",
    "image_size",
    "feature_stride",
    "histogram_equalise",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "loss",
    "focal_gamma",
    "pos_weight_max",
    "augment",
    "seed",
    "init_from",
)


def _fingerprint(tc: TrainConfig, total_steps: int, data_sha: str, val_sha: str = "") -> dict[str, Any]:
    settings = {k: getattr(tc, k) for k in _RUN_SETTINGS}
    settings["labels"] = list(tc.labels)
    settings["init_from"] = str(tc.init_from) if tc.init_from else None
    return {**settings, "total_steps": total_steps, "data_sha256": data_sha, "val_sha256": val_sha}


def fit(
    net: torch.nn.Module,
    splits: Splits,
    cfg: dict[str, Any],
    tc: TrainConfig,
) -> tuple[dict[str, torch.Tensor], int, list[dict[str, Any]], CachedImages, CachedImages]:
    """Train; returns (best state, best epoch, history, val dataset, test dataset)."""
    device = resolve_device(tc.device)
    rank, world = init_distributed(device.type)
    use_amp = device.type == "cuda"
    # bf16 where the GPU has it (no loss scaling needed), else fp16 with a GradScaler.
    amp_dtype = torch.bfloat16 if use_amp and torch.cuda.is_bf16_supported() else torch.float16
    torch.manual_seed(tc.seed)
    np.random.seed(tc.seed)
    t0 = time.monotonic()
    splits, report = cache_splits(splits, cfg, tc)
    cache = cache_dir_for(tc)
    train_ds = CachedImages(splits.train, cfg, cache)
    val_ds = CachedImages(splits.val, cfg, cache)
    test_ds = CachedImages(splits.test, cfg, cache)
    log.info(
        "%d/%d/%d preprocessed images in the disk cache %s (%d built now, %.1fs)",
        len(train_ds),
        len(val_ds),
        len(test_ds),
        cache,
        report.built,
        time.monotonic() - t0,
    )
    if not len(train_ds):
        raise ValueError(f"no readable training image (skipped: {report.skipped})")
    generator = torch.Generator().manual_seed(tc.seed)
    # DDP: each process takes its share of every epoch's shuffled order (the sampler is seeded per epoch).
    sampler = (
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
    steps_per_epoch = len(loader)
    total_steps = max(1, steps_per_epoch * tc.epochs)

    net.to(device)
    model: torch.nn.Module = net
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[device.index] if device.type == "cuda" else None
        )
        log.info("DDP: rank %d of %d, %d training batches per process per epoch", rank, world, len(loader))
    pos_weight = positive_weights(splits.train, len(tc.labels), tc.pos_weight_max).to(device)
    optimizer = torch.optim.AdamW(net.parameters(), lr=tc.lr, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tc.lr, total_steps=total_steps)
    scaler = torch.amp.GradScaler(device.type, enabled=use_amp and amp_dtype == torch.float16)

    # A checkpoint only resumes the same run: same labels, size, schedule and training images.
    fingerprint = _fingerprint(
        tc,
        total_steps,
        str(data_summary(splits.train, tc.labels)["sha256"]),
        str(data_summary(splits.val, tc.labels)["sha256"]),
    )
    fingerprint["world_size"] = world
    ckpt_dir = tc.checkpoint_dir
    start_epoch, best_score, best_epoch = 0, -math.inf, 0
    best_state: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in net.state_dict().items()}
    history: list[dict[str, Any]] = []
    if ckpt_dir is not None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        last = ckpt_dir / "last.pt"
        if tc.resume and last.is_file():
            ckpt = torch.load(last, map_location=device, weights_only=False)
            if ckpt["fingerprint"] != fingerprint:
                raise ValueError(
                    f"checkpoint {last} was written for a different run "
                    f"({ckpt['fingerprint']} != {fingerprint}); start afresh without --resume"
                )
            net.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
            start_epoch, best_score, best_epoch = ckpt["epoch"], ckpt["best_score"], ckpt["best_epoch"]
            history = ckpt["history"]
            best_state = torch.load(ckpt_dir / "best.pt", map_location="cpu", weights_only=True)
            log.info("resumed from %s after epoch %d (best epoch %d)", last, start_epoch, best_epoch)
        elif tc.resume:
            log.warning("--resume given but %s does not exist: starting afresh", last)
    writer = _tensorboard(tc) if rank == 0 else None
    show_bar = tc.log_every > 0 and sys.stderr.isatty() and rank == 0
    aug_gen = torch.Generator()

    last_epoch = min(tc.epochs, tc.stop_after or tc.epochs)
    for epoch in range(start_epoch + 1, last_epoch + 1):
        # Shuffling and augmentation are seeded per epoch, so a resumed run draws exactly what an
        # uninterrupted one would have drawn.
        generator.manual_seed(tc.seed * 100_003 + epoch)
        aug_gen.manual_seed(tc.seed * 100_003 + epoch + 7919 + 1_000_003 * rank)
        if sampler is not None:
            sampler.set_epoch(epoch)
        net.train()
        t_epoch = time.monotonic()
        running, seen = 0.0, 0
        for step, batch in enumerate(_progress(loader, f"epoch {epoch}/{tc.epochs}", show_bar), start=1):
            x = _tensor(batch["image"]).to(device, non_blocking=True)
            y = _tensor(batch["label"]).to(device, non_blocking=True)
            if tc.augment:
                x = augment_batch(x, aug_gen)
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                logits = model(x)
            loss = multilabel_loss(logits, y, pos_weight, tc.loss, tc.focal_gamma)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            running += float(loss.detach()) * x.shape[0]
            seen += x.shape[0]
            if writer is not None:
                global_step = (epoch - 1) * steps_per_epoch + step
                writer.add_scalar("train/loss", float(loss.detach()), global_step)
                writer.add_scalar("train/lr", scheduler.get_last_lr()[0], global_step)
            if tc.log_every and (step % tc.log_every == 0 or step == steps_per_epoch):
                rate = seen / max(time.monotonic() - t_epoch, 1e-9)
                log.info(
                    "epoch %d/%d step %d/%d loss %.4f lr %.2e %.1f img/s",
                    epoch,
                    tc.epochs,
                    step,
                    steps_per_epoch,
                    running / seen,
                    scheduler.get_last_lr()[0],
                    rate,
                )
        train_loss = running / max(seen, 1)
        val_logits, val_y, _ = predict_logits(net, val_ds, tc.batch_size, device)
        val_loss = (
            float(
                multilabel_loss(
                    torch.as_tensor(val_logits),
                    torch.as_tensor(val_y),
                    pos_weight.cpu(),
                    tc.loss,
                    tc.focal_gamma,
                )
            )
            if len(val_y)
            else math.nan
        )
        val_auroc = (
            compute_metrics(val_y, sigmoid(val_logits), tc.labels)["mean_auroc"] if len(val_y) else None
        )
        # Select by validation mean AUROC; where it is undefined (tiny validation sets), by val loss.
        score = (
            val_auroc if val_auroc is not None else (-val_loss if math.isfinite(val_loss) else -train_loss)
        )
        improved = score > best_score
        if improved:
            best_score, best_epoch = score, epoch
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        history.append(
            {
                "epoch": epoch,
                "train_loss": train_loss,
                "val_loss": val_loss if math.isfinite(val_loss) else None,  # JSON has no NaN
                "val_mean_auroc": val_auroc,
                "seconds": time.monotonic() - t_epoch,
            }
        )
        log.info(
            "epoch %d/%d done in %.0fs: train loss %.4f, val loss %.4f, val mean AUROC %s%s",
            epoch,
            tc.epochs,
            time.monotonic() - t_epoch,
            train_loss,
            val_loss,
            "n/a" if val_auroc is None else f"{val_auroc:.4f}",
            " (best)" if improved else "",
        )
        if writer is not None:
            writer.add_scalar("epoch/train_loss", train_loss, epoch)
            if math.isfinite(val_loss):
                writer.add_scalar("epoch/val_loss", val_loss, epoch)
            if val_auroc is not None:
                writer.add_scalar("epoch/val_mean_auroc", val_auroc, epoch)
            writer.flush()
        if ckpt_dir is not None and rank == 0:
            if improved:
                _atomic_save(best_state, ckpt_dir / "best.pt")
            _atomic_save(
                {
                    "model": net.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "scaler": scaler.state_dict(),
                    "epoch": epoch,
                    "best_score": best_score,
                    "best_epoch": best_epoch,
                    "history": history,
                    "fingerprint": fingerprint,
                },
                ckpt_dir / "last.pt",
            )
    if writer is not None:
        writer.close()
    _barrier()  # every process has finished; rank 0's checkpoints are on disk
    return best_state, best_epoch, history, val_ds, test_ds


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


# ---------------------------------------------------------------------------------------------- reference


def read_reference(csv_path: Path, labels: Sequence[str]) -> dict[str, npt.NDArray[np.float64]]:
    """Image name → probabilities in ``labels`` order from a CSV with ``Image Index`` + ``prob_<label>``."""
    out: dict[str, npt.NDArray[np.float64]] = {}
    with csv_path.open(newline="") as fh:
        reader = csv.DictReader(fh)
        cols = set(reader.fieldnames or ())
        missing = [lb for lb in labels if f"prob_{lb}" not in cols and lb not in cols]
        if missing:
            raise ValueError(f"{csv_path} has no column for {missing}")
        for row in reader:
            out[row["Image Index"].strip()] = np.asarray(
                [float(row.get(f"prob_{lb}", row.get(lb, "nan"))) for lb in labels], dtype=np.float64
            )
    return out


def reference_comparison(
    names: Sequence[str], y: npt.ArrayLike, p: npt.ArrayLike, labels: Sequence[str], csv_path: Path
) -> dict[str, Any]:
    """Model vs reference AUROC on the images present in both (the reference CSV covers a subset)."""
    ref = read_reference(csv_path, labels)
    idx = [i for i, n in enumerate(names) if n in ref]
    yy = np.asarray(y)[idx]
    model = compute_metrics(yy, np.asarray(p)[idx], labels)
    reference = compute_metrics(
        yy, np.stack([ref[names[i]] for i in idx]) if idx else np.zeros((0, len(labels))), labels
    )
    return {
        "reference_csv": str(csv_path),
        "n_images": len(idx),
        "model": {"auroc": model["auroc"], "mean_auroc": model["mean_auroc"]},
        "reference": {"auroc": reference["auroc"], "mean_auroc": reference["mean_auroc"]},
        "notes": model["notes"][2:],
    }


# ---------------------------------------------------------------------------------------------- card


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def model_card(tc: TrainConfig, result: TrainResult, summary: dict[str, Any]) -> str:
    m = result.metrics
    ref = m.get("reference_comparison")
    init = f"fine-tuned from {tc.init_from}" if tc.init_from else "random (trained from scratch)"
    aug = Augmentation().describe() if tc.augment else "none"
    tr, va, te = summary["train"], summary["val"], summary["test"]
    lines = [
        f"# {tc.name} {tc.version} — demonstration model",
        "",
        "**Not for clinical use.** A demonstration of the training pipeline, not a medical device: its "
        "accuracy is far below a model trained on the full ChestX-ray14 set.",
        "",
        f"- Architecture: MONAI `DenseNet121`, 2-D, 1 channel, {len(tc.labels)} sigmoid outputs "
        f"({', '.join(tc.labels)}); feature stride {tc.feature_stride} "
        f"({max(1, tc.image_size // tc.feature_stride)} × {max(1, tc.image_size // tc.feature_stride)} "
        "heatmap cells"
        + ("" if tc.feature_stride == 32 else ", last transitions without pooling: `DenseNet121Fine`")
        + ").",
        f"- Initialisation: {init}.",
        f"- Training data: {tr['images']} images of {tr['patients']} patients (validation {va['images']} / "
        f"{va['patients']}, held-out test {te['images']} / {te['patients']}), split by patient with seed "
        f"{tc.seed}; training images per source {tr['sources']}.",
        f"- Input: {'histogram equalisation, then ' if tc.histogram_equalise else ''}resize to "
        f"{tc.image_size} × {tc.image_size} (area), (x − 0.5) / 0.25 on display values in "
        "[0, 1] — `configs/inference.json`, the same definition the worker runs.",
        f"- Training: {tc.epochs} epochs, batch {tc.batch_size}, AdamW (weight decay {tc.weight_decay}), "
        f"one-cycle LR peak {tc.lr}, loss {tc.loss} with pos_weight = neg/pos clipped to "
        f"[1, {tc.pos_weight_max}], augmentation: {aug}.",
        f"- Best epoch {result.best_epoch} by {result.extra['selected_by']}; temperature "
        f"{result.temperature:.3f} fitted on validation logits (NLL), then per-finding Platt scaling "
        "(scale + bias per finding, `calibration` in `configs/metadata.json`) fitted on the same validation "
        f"logits; operating points maximise {tc.operating_point.upper()} on calibrated validation "
        "probabilities.",
        "",
        f"## Measured on its own held-out test split ({m['n_images']} images)",
        "",
        f"Mean AUROC {_fmt(m['mean_auroc'])} over {m['mean_auroc_labels']} findings; micro-F1 "
        f"{_fmt(m['micro_f1'])}, macro-F1 {_fmt(m['macro_f1'])}, Hamming loss {_fmt(m['hamming_loss'])}, "
        f"ECE {_fmt(m['ece'])} after calibration, {_fmt(m.get('ece_before_calibration'))} with the "
        "temperature alone; the SR and SC call the outputs probabilities only when calibration lowers "
        f"the test ECE ({'it did' if result.extra.get('calibrated') else 'it did not'}).",
        "",
    ]
    header = "| finding | test positives | AUROC | AP | F1 |"
    if ref:
        header += (
            f" AUROC on the {ref['n_images']} dev-set test images | reference CheXNet AUROC, same images |"
        )
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for lb in tc.labels:
        row = (
            f"| {lb} | {m['positives'][lb]} | {_fmt(m['auroc'][lb])} | {_fmt(m['average_precision'][lb])} "
            f"| {_fmt(m['f1'][lb])} |"
        )
        if ref:
            row += f" {_fmt(ref['model']['auroc'][lb])} | {_fmt(ref['reference']['auroc'][lb])} |"
        lines.append(row)
    if ref:
        lines += [
            "",
            f"On the {ref['n_images']} test images that the reference CheXNet reproduction also scored: "
            f"this model's mean AUROC {_fmt(ref['model']['mean_auroc'])}, the reference's "
            f"{_fmt(ref['reference']['mean_auroc'])}.",
        ]
    lines += [
        "",
        "AUROC is undefined (n/a) where the test split holds no positive; such findings are left out "
        "of the mean. With so few positives per finding the confidence intervals are wide (±0.1 and more).",
        "",
        "## Notes",
        "",
        tc.notes.strip() or "(none)",
        "",
    ]
    return "\n".join(lines)


# Settings a configs/train.json may hold (and `train --config` reads back); CLI flags override them.
TRAIN_SETTINGS = (
    "labels",
    "image_size",
    "feature_stride",
    "histogram_equalise",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "loss",
    "focal_gamma",
    "pos_weight_max",
    "augment",
    "seed",
    "operating_point",
    "name",
)


def train_settings(tc: TrainConfig) -> dict[str, Any]:
    out = {k: getattr(tc, k) for k in TRAIN_SETTINGS}
    out["labels"] = list(tc.labels)
    return out


# ---------------------------------------------------------------------------------------------- driver


def train_and_export(splits: Splits, tc: TrainConfig, out_dir: Path) -> TrainResult:
    """Train on ``splits``, calibrate on validation, measure on test, write the bundle to ``out_dir``."""
    check_no_leakage(splits)
    if not splits.train:
        raise ValueError("the training split is empty")
    if tc.init_from is not None:
        check_finetune_leakage(tc.init_from, splits)
    if tc.init_from is not None:
        net, cfg, shared = init_from_bundle(tc.init_from, tc.labels, tc.image_size)
        tc.image_size = int(cfg["image_size"])
        log.info("fine-tuning from %s; output neurons kept for %s", tc.init_from, shared or "no label")
    else:
        torch.manual_seed(tc.seed)
        cfg = inference_config(len(tc.labels), tc.image_size, tc.feature_stride, tc.histogram_equalise)
        net = build_network(cfg)
        shared = []
    if tc.checkpoint_dir is None:
        tc.checkpoint_dir = out_dir.parent / f"{out_dir.name}.checkpoints"

    # Unreadable or non-image files are dropped here (counted per reason), before anything is measured.
    splits, cache_report = cache_splits(splits, cfg, tc)
    best_state, best_epoch, history, val_ds, test_ds = fit(net, splits, cfg, tc)
    rank, world = init_distributed(resolve_device(tc.device).type)
    if rank != 0:  # DDP: the other processes are done; rank 0 calibrates, measures and exports
        return TrainResult(
            out_dir, history, best_epoch, 1.0, {}, {}, [], np.zeros((0, len(tc.labels)), np.float32)
        )
    if len(history) < tc.epochs:
        raise TrainingStopped(
            f"stopped after epoch {len(history)} of {tc.epochs}; checkpoint in {tc.checkpoint_dir} "
            "(run again with --resume to continue)"
        )
    if tc.fp16_export:
        # Measure the weights that ship: the bundle stores fp16, so round before calibrating/evaluating.
        best_state = {k: v.half().float() if v.is_floating_point() else v for k, v in best_state.items()}
    net.load_state_dict(best_state)
    device = resolve_device(tc.device)
    net.to(device)

    val_logits, val_y, _ = predict_logits(net, val_ds, tc.batch_size, device)
    temperature = fit_temperature(val_logits, val_y) if len(val_y) else 1.0
    # Per-finding Platt scaling on validation, applied by the worker's code (worker.inference.calibration).
    by_temperature = Calibration.temperature(tc.labels, temperature)
    calibration = fit_platt(val_logits, val_y, tc.labels) if len(val_y) else by_temperature
    val_p = calibration.probabilities(val_logits)
    points, defaulted = choose_operating_points(val_y, val_p, tc.labels, tc.operating_point)
    test_logits, test_y, test_names = predict_logits(net, test_ds, tc.batch_size, device)
    test_p = calibration.probabilities(test_logits)
    metrics = compute_metrics(test_y, test_p, tc.labels, points)
    metrics["split"] = "test"
    metrics["operating_point_method"] = tc.operating_point
    metrics["calibration_method"] = calibration.method
    metrics["ece_before_calibration"] = compute_metrics(
        test_y, by_temperature.probabilities(test_logits), tc.labels
    )["ece"]
    # The outputs are called probabilities only when calibration holds on the held-out test split.
    holds = (
        calibration.method == "platt"
        and metrics["ece"] is not None
        and metrics["ece_before_calibration"] is not None
        and metrics["ece"] < metrics["ece_before_calibration"]
    )
    calibration = replace(calibration, calibrated=holds)
    if defaulted:
        metrics["notes"].append(
            f"operating point 0.5 (validation had one class only): {', '.join(defaulted)}"
        )
    val_metrics = compute_metrics(val_y, val_p, tc.labels, points)
    metrics["validation"] = {k: val_metrics[k] for k in ("mean_auroc", "auroc", "ece", "n_images")}
    metrics["validation"]["ece_before_temperature"] = compute_metrics(val_y, sigmoid(val_logits), tc.labels)[
        "ece"
    ]
    if tc.reference_predictions is not None:
        metrics["reference_comparison"] = reference_comparison(
            test_names, test_y, test_p, tc.labels, tc.reference_predictions
        )

    summary = {name: data_summary(recs, tc.labels) for name, recs in splits.items()}
    result = TrainResult(
        bundle=out_dir,
        history=history,
        best_epoch=best_epoch,
        temperature=temperature,
        operating_points=points,
        metrics=metrics,
        test_names=test_names,
        test_probabilities=test_p,
        extra={
            "shared_labels": shared,
            "calibrated": calibration.calibrated,
            # fit() falls back to validation loss when no label has both classes in validation.
            "selected_by": "validation mean AUROC"
            if any(h["val_mean_auroc"] is not None for h in history)
            else "validation loss",
        },
    )
    training_data = {
        **summary["train"],
        "splits": {
            name: {k: s[k] for k in ("images", "patients", "sha256", "positives")}
            for name, s in summary.items()
        },
        "split_unit": "patient",
        "processes": world,
        "skipped": {"counts": cache_report.skipped, "examples": cache_report.skipped_examples},
        **({"dicom_folders": tc.input_report} if tc.input_report else {}),
        "seed": tc.seed,
        "history": history,
        "best_epoch": best_epoch,
        "selected_by": result.extra["selected_by"],
        "config": {
            k: (str(v) if isinstance(v, Path) else v)
            for k, v in asdict(tc).items()
            if k not in {"notes", "input_report"}
        },
    }
    export_bundle(
        out_dir,
        net.cpu(),
        cfg,
        name=tc.name,
        version=tc.version,
        labels=tc.labels,
        operating_points=points,
        temperature=temperature,
        calibration={
            **calibration.as_metadata(),
            "fitted_on": {"split": "val", "images": len(val_y)},
            "ece_test_before": metrics["ece_before_calibration"],
            "ece_test_after": metrics["ece"],
        },
        metrics=metrics,
        training_data=training_data,
        model_card=model_card(tc, result, summary),
        fp16=tc.fp16_export,
    )
    docs = out_dir / "docs"
    (docs / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    # The settings that made this bundle (MONAI bundle convention): `train --config` reruns them.
    (out_dir / "configs" / "train.json").write_text(json.dumps(train_settings(tc), indent=2) + "\n")
    write_curves(test_y, test_p, tc.labels, docs)
    with (docs / SPLITS_FILE).open("w", newline="") as fh:
        # Which patient/image was used for what: fine-tuning from this bundle checks against it.
        writer = csv.writer(fh)
        writer.writerow(["Image Index", "Patient ID", "split"])
        for split_name, recs in splits.items():
            writer.writerows([r.name, r.patient_id, split_name] for r in recs)
    with (docs / "test_predictions.csv").open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", *(f"prob_{lb}" for lb in tc.labels)])
        for name, row in zip(test_names, test_p, strict=True):
            writer.writerow([name, *(f"{v:.6f}" for v in row)])
    log.info("bundle written to %s: test mean AUROC %s", out_dir, _fmt(metrics["mean_auroc"]))
    return result
