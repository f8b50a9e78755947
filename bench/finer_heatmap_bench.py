"""Finer heatmaps: CPU inference per image of the 4 × 4-cell bundle the issue measured against ("today",
0.2.1) vs a finer-map bundle (default: the shipped one), one process.

Run: .venv/bin/python bench/finer_heatmap_bench.py [--fine BUNDLE] [--today BUNDLE] [--threads 1]
[--images 16] [--rounds 5]

Everything goes through the worker's own Predictor on the same real 512 px dev images, one image per call
(a study's usual batch), preprocessing and all 14 class-activation maps included. The finer bundle runs
as the worker runs it on a CPU (``precision=auto``: its checked int8 graph when it ships one) and, when
that is int8, at fp32 too, so the int8 share of the gain shows. Rounds alternate the predictors so a busy
machine slows them alike; the median of the per-round times is reported. Without --today, a randomly
initialised bundle of 0.2.1's shape (128² input, DenseNet-121 at stride 32, fp32) stands in for it: speed
does not depend on the weights. The real 0.2.1 lies in git::

    mkdir -p /tmp/b021 && git archive 7928399^ worker/bundles/cxr14_densenet121 | tar -x -C /tmp/b021
    # then --today /tmp/b021/worker/bundles/cxr14_densenet121
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import random_bundle
from PIL import Image

from monai_train.data import load_image
from service.core.settings import DEFAULT_BUNDLE
from worker.inference.bundle import load_bundle
from worker.inference.predictor import Predictor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "nih-cxr14-dev" / "images"


def _per_image(predictor: Predictor, images: list[np.ndarray]) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process) per image."""
    t0, c0 = time.perf_counter(), time.process_time()
    for img in images:
        predictor.predict([img])
    return (time.perf_counter() - t0) / len(images), (time.process_time() - c0) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument(
        "--fine", type=Path, default=DEFAULT_BUNDLE, help="finer-map bundle (default: the shipped one)"
    )
    parser.add_argument(
        "--today",
        type=Path,
        default=None,
        help="the 4 × 4 bundle to compare with (default: a random one of 0.2.1's shape)",
    )
    parser.add_argument(
        "--today-precision",
        choices=("fp32", "auto"),
        default="fp32",
        help="fp32: as 0.2.1 ran; auto: its int8 graph too when it has one (like for like)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--side",
        type=int,
        default=0,
        help="resize the display images to this square side first (1024: NIH's native size; 0: as stored)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = [load_image(p) for p in sorted(SHARED.glob("*.png"))[: args.images]]
    if args.side:
        images = [
            np.asarray(
                Image.fromarray(img).resize((args.side, args.side), Image.Resampling.BILINEAR), np.float32
            )
            for img in images
        ]
    with tempfile.TemporaryDirectory() as tmp:
        today_dir = args.today or random_bundle(Path(tmp) / "today", 128, feature_stride=32)
        predictors = {
            "today": Predictor(load_bundle(today_dir), threads=args.threads, precision=args.today_precision),
            "fine": Predictor(load_bundle(args.fine), threads=args.threads),
        }
        if predictors["fine"].precision != "fp32":
            fp32 = Predictor(load_bundle(args.fine), threads=args.threads, precision="fp32")
            predictors["fine fp32"] = fp32
        shapes = {name: p.predict(images[:1]).cams.shape[2:] for name, p in predictors.items()}
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in predictors}
        for _ in range(args.rounds):
            for name, p in predictors.items():
                times[name].append(_per_image(p, images))
    wall = {k: statistics.median(w for w, _ in v) for k, v in times.items()}
    cpu = {k: statistics.median(c for _, c in v) for k, v in times.items()}
    side = f"{images[0].shape[1]}×{images[0].shape[0]}"
    print(f"threads={args.threads}, {len(images)} dev images ({side}), one per call, {args.rounds} rounds")
    for name, p in predictors.items():
        h, w = shapes[name]
        print(
            f"{name:9s} {p.bundle.name} {p.bundle.version} ({p.backend}, {p.precision}): {h} × {w} map "
            f"cells, {wall[name] * 1000:7.1f} ms/image wall, {cpu[name] * 1000:7.1f} ms/image CPU, "
            f"ratio to today {wall[name] / wall['today']:.2f} wall, {cpu[name] / cpu['today']:.2f} CPU"
        )
    print("goal: the finer bundle as the worker runs it (the 'fine' line) ≤ 2 × today")


if __name__ == "__main__":
    main()
