"""CPU inference throughput: plain torch vs plain ONNX Runtime vs the worker's Predictor, one process.

Run: .venv/bin/python bench/inference_bench.py [--threads 2] [--batch 8] [--size 224] [--repeats 5]
The network is DenseNet-121 (MONAI, 1 channel, 14 outputs) at --size² from a temporary bundle; the
Predictor figure includes preprocessing of 1024² display images and all 14 class-activation maps.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from common import random_bundle

from worker.inference.bundle import load_bundle
from worker.inference.predictor import Predictor


def _rate(fn: Callable[[], object], n: int, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return n / statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    n, s = args.batch, args.size

    with tempfile.TemporaryDirectory() as tmp:
        out = random_bundle(Path(tmp) / "b", s)
        bundle = load_bundle(out)
        net = bundle.network()
        x = torch.randn(n, 1, s, s)

        def torch_forward() -> object:
            with torch.inference_mode():
                return net(x)

        plain = Path(tmp) / "plain.onnx"
        torch.onnx.export(
            net,
            (x[:1],),
            str(plain),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes={"image": {0: "n"}},
            opset_version=17,
            dynamo=False,
        )
        so = ort.SessionOptions()
        so.intra_op_num_threads = args.threads
        session = ort.InferenceSession(str(plain), so, providers=["CPUExecutionProvider"])
        xn = x.numpy()

        rng = np.random.default_rng(0)
        images = [rng.random((1024, 1024), dtype=np.float32) for _ in range(n)]
        predictor = Predictor(bundle, threads=args.threads)

        r_torch = _rate(torch_forward, n, args.repeats)
        r_ort = _rate(lambda: session.run(None, {"image": xn}), n, args.repeats)
        r_pred = _rate(lambda: predictor.predict(images), n, args.repeats)

    print(f"DenseNet-121 {s}², batch {n}, {args.threads} threads (medians of {args.repeats})")
    print(f"torch forward (logits only)            {r_torch:6.1f} img/s")
    print(f"ONNX Runtime forward (logits only)     {r_ort:6.1f} img/s")
    print(f"worker Predictor [{predictor.backend}] (+preproc +14 CAMs) {r_pred:6.1f} img/s")
    print(f"Predictor / ONNX Runtime: {r_pred / r_ort:.2f}   Predictor / torch: {r_pred / r_torch:.2f}")


if __name__ == "__main__":
    main()
