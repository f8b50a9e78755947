"""Training settings as a config file stored in the bundle (configs/train.json); flags override it."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from monai_train.__main__ import main


def test_config_file_defaults_flags_override_and_the_bundle_keeps_them(
    small_set: Path, tmp_path: Path
) -> None:
    with (small_set / "labels.csv").open(newline="") as fh:
        rows = list(csv.reader(fh))
    (tmp_path / "labels.csv").write_text("\n".join(",".join(r) for r in rows[:41]) + "\n")
    config = tmp_path / "train.json"
    config.write_text(
        json.dumps(
            {
                "labels": ["Effusion", "Cardiomegaly"],
                "image_size": 32,
                "epochs": 1,
                "lr": 0.002,
                "augment": False,
            }
        )
    )
    out = tmp_path / "b"
    args = ["train", "--config", str(config), "--lr", "0.003", "--images", str(small_set / "images")]
    args += [
        "--labels",
        str(tmp_path / "labels.csv"),
        "--out",
        str(out),
        "--version",
        "c",
        "--log-every",
        "0",
    ]
    main([*args, "--no-tensorboard"])
    stored = json.loads((out / "configs" / "train.json").read_text())
    assert stored["labels"] == ["Effusion", "Cardiomegaly"] and stored["image_size"] == 32
    assert stored["lr"] == 0.003 and stored["epochs"] == 1 and stored["augment"] is False
    # The stored file reruns the same settings.
    again = tmp_path / "b2"
    rerun = ["train", "--config", str(out / "configs" / "train.json"), *args[5:9], "--out", str(again)]
    main([*rerun, "--version", "c2", "--log-every", "0", "--no-tensorboard"])
    assert json.loads((again / "configs" / "train.json").read_text()) == stored

    config.write_text(json.dumps({"learning_rate": 1}))
    with pytest.raises(SystemExit, match="unknown training settings"):
        main([*args, "--no-tensorboard"])
