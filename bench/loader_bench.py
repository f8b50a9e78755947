"""Training data loading from the disk cache: augmented 224² images per second, no network.

Run: .venv/bin/python bench/loader_bench.py [--size 224] [--workers 2] [--batch 32] [--passes 3] [--cache DIR]

1. Builds (or reuses) the disk cache of the shared NIH images (321 dev at 512 px + 1000 at 64 px) through
   the worker's rendering chain and the bundle's preprocessing, in --workers processes: decode rate.
2. Streams them as training does (shuffled DataLoader with --workers reader processes, memory-mapped
   .npy files) and augments every batch (`augment_batch`: rotation, zoom, gamma, contrast, brightness)
   on the CPU: the rate a GPU would be fed at. The first pass warms the page cache; later passes count.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch

from monai_train.bundle import NIH_LABELS, inference_config
from monai_train.cache import CachedImages, augment_batch, build_cache
from monai_train.data import combine, read_records

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = combine(
        read_records(SHARED / name / "images", SHARED / name / "labels.csv", NIH_LABELS)
        for name in ("nih-cxr14-dev", "nih-cxr14-64px")
    )
    cfg = inference_config(len(NIH_LABELS), args.size)
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or Path(tmp) / "cache"
        report = build_cache(records, cfg, cache, workers=args.workers)
        print(
            f"cache: {len(report.records)} images, {report.built} preprocessed now in {report.seconds:.1f}s "
            f"({report.built / max(report.seconds, 1e-9):.0f} images/s with {args.workers} processes), "
            f"skipped {report.skipped or 'none'}"
        )
        ds = CachedImages(report.records, cfg, cache)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=args.batch,
            shuffle=True,
            num_workers=args.workers,
            persistent_workers=args.workers > 0,
            generator=torch.Generator().manual_seed(0),
        )
        gen = torch.Generator().manual_seed(0)
        rates = []
        for p in range(args.passes):
            t0, n = time.perf_counter(), 0
            for batch in loader:
                x = augment_batch(batch["image"], gen)
                n += x.shape[0]
            rate = n / (time.perf_counter() - t0)
            rates.append(rate)
            print(f"pass {p + 1}: {n} augmented {args.size}² images, {rate:.0f} images/s")
    warm = rates[1:] or rates
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"loader (warm passes): {sum(warm) / len(warm):.0f} augmented {args.size}² images/s on "
        f"{args.workers} reader processes + 1 augmenting; main process peak RSS {peak_mb:.0f} MB"
    )


if __name__ == "__main__":
    main()
