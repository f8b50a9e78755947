"""DDP: ``torchrun`` with two CPU processes on gloo trains one bundle (rank 0 exports it)."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]


def test_torchrun_two_cpu_processes_on_gloo(small_set: Path, tmp_path: Path) -> None:
    with (small_set / "labels.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    (tmp_path / "labels.csv").write_text("\n".join(",".join(r) for r in rows[:49]) + "\n")  # 48 images
    out = tmp_path / "bundle"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "monai_train", "train", "--images", str(small_set / "images")]
    cmd += ["--labels", str(tmp_path / "labels.csv"), "--out", str(out), "--version", "ddp"]
    cmd += ["--image-size", "32", "--epochs", "1", "--batch-size", "4", "--threads", "1", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DDP: rank 0 of 2" in done.stderr and "DDP: rank 1 of 2" in done.stderr
    meta = json.loads((out / "configs" / "metadata.json").read_text())
    assert meta["training_data"]["processes"] == 2 and meta["version"] == "ddp"
    assert (out / "models" / "model.safetensors").is_file()
    # Each process ran half of the epoch's batches.
    train_images = meta["training_data"]["images"]
    per_process = math.ceil(train_images / 2)  # DistributedSampler pads to equal shares
    steps = math.ceil(per_process / 4)
    assert f"step {steps}/{steps}" in done.stderr
