"""Cost of heatmaps for all 14 findings: inference alone vs inference + CAMs vs MONAI Grad-CAM.

Run: .venv/bin/python bench/heatmap_bench.py [--threads 2] [--batch 8] [--repeats 5]
All three are measured in one process on the same inputs with the shipped bundle.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from service.core.settings import DEFAULT_BUNDLE
from worker.inference.bundle import load_bundle
from worker.inference.predictor import Predictor


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    bundle = load_bundle(DEFAULT_BUNDLE)
    cam = Predictor(bundle, cam_method="cam", backend="torch")
    grad = Predictor(bundle, cam_method="gradcam")
    rng = np.random.default_rng(0)
    images = [rng.random((1024, 1024), dtype=np.float32) for _ in range(args.batch)]
    x = cam.prepare(images)

    def forward_only() -> object:
        with torch.inference_mode():
            return cam.net(x)

    t_forward = _time(forward_only, args.repeats)
    t_cam = _time(lambda: cam.predict(images), args.repeats)
    t_pre = _time(lambda: cam.prepare(images), args.repeats)
    t_grad_one = _time(lambda: grad.predict(images[:1]), max(1, args.repeats // 2))

    n = args.batch
    print(f"threads={args.threads} batch={n} input=1024² → {bundle.parser.get('image_size')}²")
    print(f"preprocessing only           {t_pre * 1000 / n:8.1f} ms/image")
    print(f"forward only (probabilities) {t_forward * 1000 / n:8.1f} ms/image")
    print(f"forward + 14 CAMs (+ preproc){t_cam * 1000 / n:8.1f} ms/image")
    extra = (t_cam - t_pre - t_forward) / t_forward
    print(f"14 heatmaps cost over forward: {extra * 100:+.1f} %")
    print(
        f"MONAI Grad-CAM, 14 classes   {t_grad_one * 1000:8.1f} ms/image "
        f"({t_grad_one * 1000 / 14:.0f} ms per class)"
    )
    print(f"CAM speed-up over Grad-CAM for 14 maps: {t_grad_one / (t_cam / n):.1f}x")


if __name__ == "__main__":
    main()
