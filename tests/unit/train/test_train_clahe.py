"""CLAHE in the one rendering chain: numpy only, stored in the bundle's preprocessing, the same in both."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from monai_train.bundle import NIH_LABELS, build_preprocessing, export_untrained, inference_config
from monai_train.cache import preprocessed
from worker.imaging import clahe
from worker.inference.bundle import load_bundle
from worker.inference.predictor import Predictor


def test_one_tile_without_a_clip_is_plain_histogram_equalisation() -> None:
    rng = np.random.default_rng(0)
    img = rng.beta(2, 5, (64, 64)).astype(np.float32)
    out = clahe(img, tiles=1, clip_limit=1e9)
    order = np.argsort(img.ravel())
    assert np.all(np.diff(out.ravel()[order]) >= -1e-6)  # monotone: one grey mapping
    # Equalised: the output's histogram is close to flat.
    counts, _ = np.histogram(out, bins=8, range=(0, 1))
    assert counts.min() > 0.5 * counts.mean() and out.min() >= 0.0 and out.max() <= 1.0


def test_the_mapping_is_local_and_a_flat_image_stays_flat() -> None:
    rng = np.random.default_rng(2)
    img = rng.normal(0.3, 0.03, (128, 128)).astype(np.float32)
    img[:, 64:] += 0.4  # dark left half, bright right half
    img[40:48, 24:32] = img[40:48, 88:96] = 0.5  # the same grey in both halves
    out = clahe(img)
    # In the dark half 0.5 is among the brightest values around, in the bright half among the darkest.
    assert out[40:48, 24:32].mean() - out[40:48, 88:96].mean() > 0.2
    glob = clahe(img, tiles=1)
    assert abs(float(glob[40:48, 24:32].mean() - glob[40:48, 88:96].mean())) < 1e-6  # one global mapping
    assert float(np.ptp(clahe(np.full((32, 48), 0.5, np.float32)))) < 1e-6
    assert clahe(img[None]).shape == (1, 128, 128)  # channel-first kept


def test_clahe_is_in_the_bundle_and_the_worker_gets_the_training_tensor(tmp_path: Path) -> None:
    cfg = inference_config(len(NIH_LABELS), 32, clahe=True)
    targets = [t["_target_"] for t in cfg["preprocessing"]["transforms"]]
    assert targets == [
        "monai.transforms.EnsureChannelFirst",
        "monai.transforms.Resize",
        "worker.imaging.Clahe",
        "monai.transforms.NormalizeIntensity",
    ]
    export_untrained(tmp_path / "b", cfg, seed=0, version="0", model_card="test", onnx=False)
    rng = np.random.default_rng(1)
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray((rng.random((90, 70)) * 255).astype(np.uint8)).save(png)
    trained_on = preprocessed(png, build_preprocessing(cfg))
    predictor = Predictor(load_bundle(tmp_path / "b"), threads=1)
    from monai_train.data import load_image

    served = predictor.prepare([load_image(png)])[0]
    assert torch.equal(trained_on, served)
    plain = preprocessed(png, build_preprocessing(inference_config(len(NIH_LABELS), 32)))
    assert not torch.allclose(trained_on, plain)
