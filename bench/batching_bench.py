"""Inference throughput in studies per minute: one study per pass vs batching across studies, one process.

Run: .venv/bin/python bench/batching_bench.py [--device auto|cpu|cuda] [--studies 256] [--threads 2]
     [--callers 16] [--max-batch 32] [--max-wait-ms 10] [--size 224] [--precision auto,fp32]

Studies are single frontal images: the real NIH ChestX-ray14 512 px PNGs from ../shared (the display
images a worker hands the predictor). The network is DenseNet-121 (MONAI, 1 channel, 14 outputs) at
--size² from a temporary bundle; each figure includes preprocessing and all 14 class-activation maps.

- "one study per pass": what a prefork worker does, each task's images in their own forward pass.
- "batched": --callers threads (a thread-pool worker's tasks) submit studies to one BatchingPredictor.
Both run in this process one after the other, so the ratio compares like with like.
"""

from __future__ import annotations

import argparse
import queue
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from common import random_bundle
from PIL import Image

from worker.inference.batcher import BatchingPredictor
from worker.inference.bundle import load_bundle
from worker.inference.predictor import Predictor

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def _images(n: int) -> list[np.ndarray]:
    paths = sorted((SHARED / "nih-cxr14-dev" / "images").glob("*.png"))
    decoded = [np.asarray(Image.open(p).convert("L"), dtype=np.float32) / 255.0 for p in paths[:n]]
    return [decoded[i % len(decoded)] for i in range(n)]


def _sequential(predictor: Predictor, studies: list[np.ndarray]) -> float:
    t0 = time.perf_counter()
    for image in studies:
        predictor.predict([image])
    return time.perf_counter() - t0


def _batched(batcher: BatchingPredictor, studies: list[np.ndarray], callers: int) -> tuple[float, float]:
    work: queue.Queue[np.ndarray] = queue.Queue()
    for image in studies:
        work.put(image)
    sizes: list[int] = []

    def caller() -> None:
        while True:
            try:
                image = work.get_nowait()
            except queue.Empty:
                return
            sizes.append(batcher.predict([image]).batch_images)

    threads = [threading.Thread(target=caller) for _ in range(callers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, float(np.mean(sizes))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="auto")
    ap.add_argument("--studies", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="torch/ONNX intra-op threads")
    ap.add_argument("--callers", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=32)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--precision", default="auto,fp32", help="comma-separated; GPU runs both by default")
    ap.add_argument("--backend", default="auto")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    studies = _images(args.studies)

    with tempfile.TemporaryDirectory() as tmp:
        bundle_dir = random_bundle(Path(tmp) / "b", args.size)
        bundle = load_bundle(bundle_dir)
        for precision in dict.fromkeys(args.precision.split(",")):
            predictor = Predictor(
                bundle, device=args.device, threads=args.threads, backend=args.backend, precision=precision
            )
            desc = predictor.description
            warm = min(len(studies), 2 * args.max_batch)
            predictor.predict(studies[: args.max_batch])  # warm-up: kernels, cuDNN autotuning
            _sequential(predictor, studies[:warm])
            t_seq = _sequential(predictor, studies)
            batcher = BatchingPredictor(predictor, args.max_batch, args.max_wait_ms / 1000)
            _batched(batcher, studies[:warm], args.callers)
            t_bat, mean_batch = _batched(batcher, studies, args.callers)
            batcher.close()
            if predictor.device.type == "cuda":
                torch.cuda.synchronize()
            n = len(studies)
            name = f"{desc['device']}/{desc['precision']}/{desc['backend']}"
            print(
                f"[{name}] {args.size}² studies={n} callers={args.callers} max_batch={args.max_batch} "
                f"max_wait={args.max_wait_ms:.0f}ms threads={args.threads}"
            )
            print(f"  one study per pass      {n / t_seq:8.1f} studies/s  {60 * n / t_seq:9.0f} /min")
            print(
                f"  batched across studies  {n / t_bat:8.1f} studies/s  {60 * n / t_bat:9.0f} /min"
                f"  (mean pass {mean_batch:.1f} images)"
            )
            print(f"  batched / one per pass: {t_seq / t_bat:.2f}x")


if __name__ == "__main__":
    main()
