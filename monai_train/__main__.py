"""``python -m monai_train``: bundle tooling for ML engineers (training lands with its own issue)."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from monai_train.bundle import NIH_LABELS, build_network, export_bundle, inference_config

UNTRAINED_CARD = """# cxr14_densenet121 — UNTRAINED demonstration bundle

**Not for diagnostic use. This network has never seen an image.**

- Architecture: MONAI `DenseNet121`, 2-D, 1 input channel, 14 sigmoid outputs (ChestX-ray14 order).
- Weights: random initialisation with `torch.manual_seed({seed})`, stored as fp16 safetensors.
- Preprocessing: `configs/inference.json` (resize to 224 × 224, area; intensity (x − 0.5) / 0.25 on
  display values in [0, 1]).
- Operating points: 0.5 for every finding (no validation data was used to choose them).
- Metrics: none measured — its outputs are meaningless. It exists so the gateway runs end to end;
  `monai_train` replaces it with a trained bundle.
"""


def init_bundle(out: Path, seed: int) -> None:
    torch.manual_seed(seed)
    cfg = inference_config(len(NIH_LABELS))
    net = build_network(cfg)
    export_bundle(
        out,
        net,
        cfg,
        name="cxr14_densenet121",
        version="0.0.1-untrained",
        labels=NIH_LABELS,
        operating_points=dict.fromkeys(NIH_LABELS, 0.5),
        temperature=1.0,
        metrics={},
        training_data={"images": 0, "note": "untrained: random initialisation"},
        model_card=UNTRAINED_CARD.format(seed=seed),
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="monai_train")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init-bundle", help="write an untrained bundle (random initialisation)")
    init.add_argument("--out", type=Path, required=True)
    init.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.command == "init-bundle":
        init_bundle(args.out, args.seed)
        print(f"bundle written to {args.out}")


if __name__ == "__main__":
    main()
