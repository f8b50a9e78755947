"""Training data at scale: a disk cache of preprocessed images, streamed, plus augmentation on whole batches.

- `build_cache` runs the worker's rendering chain (`worker.imaging`, via ``load_image``) and the bundle's
  preprocessing **once per image**, in ``workers`` processes, and writes one float32 ``.npy`` per image
  under ``cache_dir`` (the exact tensor the worker would feed the network, so training-time evaluation
  equals the worker's). The file name is a hash of the image's path, size, mtime and the preprocessing
  config, so a changed image or config is preprocessed again and a finished one never is. Unreadable or
  non-image files are skipped and counted per reason (`worker.imaging` reason codes); they never stop a run.
- `CachedImages` reads those files memory-mapped: memory stays flat in the number of images (the OS page
  cache holds what fits), and DataLoader workers can read in parallel.
- `augment_batch` augments a whole batch at once with torch ops (one affine grid-sample for rotation and
  zoom, then gamma, contrast and brightness), on whatever device the batch is on — the GPU when training
  there — from a seeded generator, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

from monai_train.config import TrainConfig
from monai_train.data import Record, Splits
from monai_train.distributed import barrier, init_distributed, training_device

log = logging.getLogger("monai_train")

_PREPROCESS: Any = None  # per worker process: the bundle's preprocessing, built once


@dataclass(frozen=True)
class CacheReport:
    records: list[Record]  # the records whose image is in the cache, in input order
    skipped: dict[str, int]  # reason → count
    skipped_examples: dict[str, list[str]]
    built: int  # images preprocessed now (the rest were cached already)
    seconds: float


def cache_key(path: Path, preprocessing: dict[str, Any], image_size: int) -> str:
    st = path.stat()
    spec = json.dumps({"p": preprocessing, "s": image_size}, sort_keys=True)
    text = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{spec}"
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _init_worker(cfg: dict[str, Any], threads: int) -> None:
    global _PREPROCESS
    torch.set_num_threads(threads)
    from monai_train.bundle import build_preprocessing

    _PREPROCESS = build_preprocessing(cfg)


def preprocessed(path: str | Path, preprocessing: Any) -> torch.Tensor:
    """Path → display image (the worker's rendering chain) → the bundle's preprocessing, converted as the
    worker's Predictor converts it: the tensor the cache stores for the image."""
    from monai_train.data import load_image

    return torch.as_tensor(np.asarray(preprocessing(load_image(path)))).float()


def _preprocess_one(job: tuple[str, str]) -> tuple[str, str | None, str]:
    """(image path, cache file) → (image path, None or a skip reason, message)."""
    from worker.imaging import PixelDataError

    src, dst = job
    try:
        tensor = np.ascontiguousarray(preprocessed(src, _PREPROCESS).numpy())
    except PixelDataError as exc:
        return src, str(exc.reason), str(exc)[:200]
    except MemoryError:
        return src, "out_of_memory", "out of memory"
    except Exception as exc:  # a file that no reader understands: skipped, never fatal
        return src, "unreadable", f"{type(exc).__name__}: {exc}"[:200]
    tmp = f"{dst}.{os.getpid()}.tmp.npy"
    np.save(tmp, tensor, allow_pickle=False)
    os.replace(tmp, dst)
    return src, None, ""


def build_cache(
    records: Sequence[Record], cfg: dict[str, Any], cache_dir: Path, *, workers: int = 0
) -> CacheReport:
    """Preprocess every record's image into ``cache_dir`` (those not cached yet), ``workers`` processes
    (0: in this process). Returns the records that made it and the skipped ones counted by reason."""
    t0 = time.monotonic()
    cache_dir.mkdir(parents=True, exist_ok=True)
    size = int(cfg.get("image_size", 0))
    targets: dict[str, Path] = {}
    skipped: Counter[str] = Counter()
    examples: dict[str, list[str]] = {}
    todo: list[tuple[str, str]] = []
    for rec in records:
        try:
            key = cache_key(rec.image, cfg["preprocessing"], size)
        except OSError as exc:
            skipped["unreadable"] += 1
            examples.setdefault("unreadable", []).append(f"{rec.name}: {exc}")
            continue
        dst = cache_dir / f"{key}.npy"
        targets[str(rec.image)] = dst
        if not dst.is_file():
            todo.append((str(rec.image), str(dst)))
    failed: dict[str, str] = {}
    if todo:
        if workers > 0:
            with ProcessPoolExecutor(workers, initializer=_init_worker, initargs=(cfg, 1)) as pool:
                results = list(pool.map(_preprocess_one, todo, chunksize=16))
        else:
            _init_worker(cfg, torch.get_num_threads())
            results = [_preprocess_one(job) for job in todo]
        for src, reason, message in results:
            if reason is not None:
                failed[src] = reason
                skipped[reason] += 1
                examples.setdefault(reason, []).append(f"{Path(src).name}: {message}")
    kept = [r for r in records if str(r.image) in targets and str(r.image) not in failed]
    if skipped:
        log.warning(
            "skipped %d of %d images: %s",
            sum(skipped.values()),
            len(records),
            ", ".join(f"{reason} {n}" for reason, n in sorted(skipped.items())),
        )
    return CacheReport(
        records=kept,
        skipped=dict(sorted(skipped.items())),
        skipped_examples={k: v[:3] for k, v in sorted(examples.items())},
        built=len(todo) - len(failed),
        seconds=time.monotonic() - t0,
    )


def cache_dir_for(tc: TrainConfig) -> Path:
    if tc.cache_dir is not None:
        return tc.cache_dir
    if tc.checkpoint_dir is not None:
        return tc.checkpoint_dir / "cache"
    return Path(tempfile.gettempdir()) / "monai_train-cache"


def cache_splits(splits: Splits, cfg: dict[str, Any], tc: TrainConfig) -> tuple[Splits, CacheReport]:
    """Preprocess every image of every split into the disk cache (once); the splits without the images
    that could not be read (counted per reason in the report, never fatal)."""
    rank, _ = init_distributed(training_device(tc.device).type)
    records = [*splits.train, *splits.val, *splits.test]
    if rank != 0:
        barrier()  # rank 0 preprocesses; the others then find every image cached
    report = build_cache(records, cfg, cache_dir_for(tc), workers=tc.workers)
    if rank == 0:
        barrier()
    kept = {str(r.image) for r in report.records}
    filtered = Splits(*([r for r in recs if str(r.image) in kept] for _, recs in splits.items()))
    return filtered, report


class CachedImages(torch.utils.data.Dataset[dict[str, Any]]):
    """Items ``{"image": (1, H, W) float32, "label": (L,) float32, "name": str}`` read from the cache."""

    def __init__(
        self,
        records: Sequence[Record],
        cfg: dict[str, Any],
        cache_dir: Path,
        soft_targets: Mapping[str, npt.ArrayLike] | None = None,
    ) -> None:
        size = int(cfg.get("image_size", 0))
        self.records = list(records)
        self.files = [
            cache_dir / f"{cache_key(r.image, cfg['preprocessing'], size)}.npy" for r in self.records
        ]
        self.labels = [np.asarray(r.labels, dtype=np.float32) for r in self.records]
        # Distillation: a reference's probabilities per image name ("soft_mask" 0 where it has none).
        soft = soft_targets or {}
        self.soft = [
            np.asarray(soft.get(r.name, np.zeros_like(y)), dtype=np.float32)
            for r, y in zip(self.records, self.labels, strict=True)
        ]
        self.soft_mask = [np.float32(r.name in soft) for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict[str, Any]:
        arr = np.load(self.files[index], mmap_mode="r", allow_pickle=False)
        return {
            "image": torch.from_numpy(np.array(arr, dtype=np.float32)),
            "label": torch.from_numpy(self.labels[index]),
            "soft": torch.from_numpy(self.soft[index]),
            "soft_mask": torch.tensor(self.soft_mask[index]),
            "name": self.records[index].name,
        }


# ---------------------------------------------------------------------------------------------- augment


@dataclass(frozen=True)
class Augmentation:
    """Mild, anatomy-preserving augmentation on the *normalised* tensor (x − 0.5) / 0.25. No flips:
    left/right matters on a chest film (heart side, situs)."""

    rotate_degrees: float = 10.0
    rotate_prob: float = 0.5
    zoom: tuple[float, float] = (0.9, 1.1)
    zoom_prob: float = 0.5
    gamma: tuple[float, float] = (0.8, 1.25)
    gamma_prob: float = 0.3
    contrast: float = 0.1  # x · (1 + U(−c, c)) about mid-grey (0 in normalised units)
    contrast_prob: float = 0.3
    brightness: float = 0.2  # x + U(−b, b) in normalised units (±0.05 of the display range)
    brightness_prob: float = 0.3

    def describe(self) -> str:
        return (
            f"rotation ±{self.rotate_degrees:g}°, zoom {self.zoom[0]:g}–{self.zoom[1]:g}, "
            "gamma/contrast/brightness (batched, on the training device)"
        )


def augment_batch(
    x: torch.Tensor, generator: torch.Generator, aug: Augmentation = Augmentation()
) -> torch.Tensor:
    """Augment (n, 1, H, W) ``x`` sample by sample, drawing every random number from ``generator`` (CPU)."""
    n = x.shape[0]
    if n == 0:
        return x

    def draw(lo: float, hi: float) -> torch.Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    def chosen(prob: float) -> torch.Tensor:
        return torch.rand(n, generator=generator) < prob

    angle = torch.where(chosen(aug.rotate_prob), draw(-1.0, 1.0) * math.radians(aug.rotate_degrees), 0.0)
    scale = torch.where(chosen(aug.zoom_prob), draw(*aug.zoom), 1.0)
    use_gamma, gamma = chosen(aug.gamma_prob), draw(*aug.gamma)
    use_contrast, contrast = chosen(aug.contrast_prob), draw(-aug.contrast, aug.contrast)
    use_bright, bright = chosen(aug.brightness_prob), draw(-aug.brightness, aug.brightness)

    dev = x.device
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale  # zoom in = sample a smaller area
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 1, 0], theta[:, 1, 1] = cos, -sin, sin, cos
    moved = (angle != 0) | (scale != 1)
    out = x
    if bool(moved.any()):
        grid = torch.nn.functional.affine_grid(theta.to(dev, x.dtype), list(x.shape), align_corners=False)
        warped = torch.nn.functional.grid_sample(
            x, grid, mode="bilinear", padding_mode="border", align_corners=False
        )
        out = torch.where(moved.to(dev).view(n, 1, 1, 1), warped, x)
    if bool(use_gamma.any()):
        lo = out.amin(dim=(1, 2, 3), keepdim=True)
        hi = out.amax(dim=(1, 2, 3), keepdim=True)
        span = (hi - lo).clamp_min(1e-6)
        g = gamma.to(dev, x.dtype).view(n, 1, 1, 1)
        adjusted = ((out - lo) / span).clamp(0, 1).pow(g) * span + lo
        out = torch.where(use_gamma.to(dev).view(n, 1, 1, 1), adjusted, out)
    factor = torch.where(use_contrast, 1.0 + contrast, 1.0).to(dev, x.dtype).view(n, 1, 1, 1)
    offset = torch.where(use_bright, bright, 0.0).to(dev, x.dtype).view(n, 1, 1, 1)
    return out * factor + offset


def simulate_low_resolution(
    x: torch.Tensor, size: int, prob: float, generator: torch.Generator
) -> torch.Tensor:
    """Pool a ``prob`` share of the (n, 1, H, W) batch down to ``size`` pixels and back up as the bundle's
    area resize does (pixel replication): what a ``size``-px thumbnail looks like at the input size. A
    thumbnail itself is unchanged; a full-resolution image loses the detail the thumbnails never had."""
    n, side = x.shape[0], x.shape[-1]
    if n == 0 or size <= 0 or size >= side:
        return x
    chosen = (torch.rand(n, generator=generator) < prob).to(x.device).view(n, 1, 1, 1)
    low = torch.nn.functional.adaptive_avg_pool2d(x, size)
    back = torch.nn.functional.interpolate(low, size=x.shape[-2:], mode="area")
    return torch.where(chosen, back, x)
