"""Finer heatmaps: CPU inference per image of today's shipped bundle vs a finer-map bundle, one process.

Run: .venv/bin/python bench/finer_heatmap_bench.py [--fine BUNDLE] [--today BUNDLE] [--threads 1]
[--images 16] [--rounds 5]

Both go through the worker's own Predictor (CPU backend chosen as in production: ONNX Runtime when the
bundle ships models/model.onnx), on the same real 512 px dev images, one image per call (a study's usual
batch), preprocessing and all 14 class-activation maps included. Rounds alternate the two bundles so a
busy machine slows both alike; the median of the per-round times is reported. Without --fine, a
randomly initialised 128² bundle with feature stride 8 (`DenseNet121Fine`) is built: speed does not
depend on the weights.
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
    parser.add_argument("--fine", type=Path, default=None, help="finer-map bundle (default: random stride 8)")
    parser.add_argument(
        "--today",
        type=Path,
        default=DEFAULT_BUNDLE,
        help="the bundle to compare with (default: the shipped one)",
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
        fine_dir = args.fine or random_bundle(Path(tmp) / "fine", 128, feature_stride=8)
        today = Predictor(load_bundle(args.today), threads=args.threads)
        fine = Predictor(load_bundle(fine_dir), threads=args.threads)
        shapes = {
            name: p.predict(images[:1]).cams.shape[2:] for name, p in (("today", today), ("fine", fine))
        }
        times: dict[str, list[tuple[float, float]]] = {"today": [], "fine": []}
        for _ in range(args.rounds):
            times["today"].append(_per_image(today, images))
            times["fine"].append(_per_image(fine, images))
    t_today, t_fine = (statistics.median(w for w, _ in times[k]) for k in ("today", "fine"))
    c_today, c_fine = (statistics.median(c for _, c in times[k]) for k in ("today", "fine"))
    side = f"{images[0].shape[1]}×{images[0].shape[0]}"
    print(f"threads={args.threads}, {len(images)} dev images ({side}), one per call, {args.rounds} rounds")
    for name, p, t, c in (("today", today, t_today, c_today), ("fine", fine, t_fine, c_fine)):
        h, w = shapes[name]
        print(
            f"{name:6s} {p.bundle.name} {p.bundle.version} ({p.backend}): {h} × {w} map cells, "
            f"{t * 1000:7.1f} ms/image wall, {c * 1000:7.1f} ms/image CPU"
        )
    print(f"ratio fine / today: {t_fine / t_today:.2f} wall, {c_fine / c_today:.2f} CPU time (goal ≤ 2)")


if __name__ == "__main__":
    main()
