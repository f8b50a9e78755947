"""``python -m monai_train quantize``: the bundle's int8 CPU graph, calibrated on its own training images and
checked on its validation images (``docs/splits.csv``); the test split is left for ``evaluate``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from monai_train.data import Record, combine, load_image, read_records
from monai_train.metrics import auroc_per_label, mean_defined
from monai_train.split_file import split_names

DEFAULT_CALIBRATION_IMAGES = 128


def quantize_from_splits(
    bundle_dir: Path,
    images: Sequence[Path],
    labels_csvs: Sequence[Path],
    *,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    tolerance: float | None = None,
    threads: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`quantize_records` with the bundle's training and validation images found among ``images``
    (its ``docs/splits.csv`` names them)."""
    from worker.inference.bundle import load_bundle

    labels = load_bundle(bundle_dir).labels
    splits = split_names(bundle_dir)
    records = combine(
        read_records(i, c, labels, missing="skip") for i, c in zip(images, labels_csvs, strict=True)
    )

    def of(split: str) -> list[Record]:
        recs = [r for r in records if r.name in splits.get(split, set())]
        if not recs:
            raise ValueError(f"none of the bundle's {split} images is in the given folders")
        return recs

    return quantize_records(
        bundle_dir,
        of("train"),
        of("val"),
        calibration_images=calibration_images,
        tolerance=tolerance,
        threads=threads,
        seed=seed,
    )


def quantize_records(
    bundle_dir: Path,
    train: Sequence[Record],
    val: Sequence[Record],
    *,
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES,
    tolerance: float | None = None,
    threads: int = 0,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``models/model.int8.onnx`` (``worker.inference.quantize``): ``calibration_images`` of the
    ``train`` images drawn with ``seed`` set the activation ranges, every ``val`` image checks the result.
    The report, stored in metadata under ``int8``, adds the validation mean AUROC of both graphs.
    Raises ``QuantizationRejected`` when the int8 graph disagrees (nothing is written then)."""
    from worker.inference.bundle import load_bundle
    from worker.inference.quantize import DEFAULT_TOLERANCE, quantize_bundle

    labels = load_bundle(bundle_dir).labels
    rng = np.random.default_rng(seed)
    drawn = rng.choice(len(train), min(calibration_images, len(train)), replace=False)
    picked = [train[i] for i in sorted(drawn)]
    y = np.asarray([r.labels for r in val], np.float64)

    def val_auroc(p_fp32: npt.NDArray[np.float32], p_int8: npt.NDArray[np.float32]) -> dict[str, Any]:
        return {
            f"val_mean_auroc_{name}": round(mean_defined(auroc_per_label(y, p, labels)), 6)
            for name, p in (("fp32", p_fp32), ("int8", p_int8))
        }

    return quantize_bundle(
        bundle_dir,
        [load_image(r.image) for r in picked],
        [load_image(r.image) for r in val],
        tolerance=DEFAULT_TOLERANCE if tolerance is None else tolerance,
        threads=threads,
        notes={"calibration_split": "train", "check_split": "val", "seed": seed},
        measure=val_auroc,
    )
