"""One rendering chain: a DICOM (or PNG) file becomes the same network input in training and in the worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from monai_train.bundle import build_preprocessing, inference_config
from monai_train.cache import preprocessed
from monai_train.data import load_image
from service.core.status import ReasonCode
from worker.dicom.decoder import DecodeLimits, IsolatedDecoder
from worker.imaging import PixelDataError, display_from_pil, read_display_file
from worker.inference.bundle import load_bundle
from worker.inference.predictor import Predictor

SHIPPED = Path(__file__).resolve().parents[3] / "worker" / "bundles" / "cxr14_densenet121"
CHEST = (
    "cr-pa-mono1-explicit-le.dcm",  # 15-bit, MONOCHROME1, modality LUT + window
    "sc-pa-jpeg-baseline.dcm",  # JPEG baseline, 8-bit
    "sc-pa-jpeg-baseline-mono1-label.dcm",  # mislabelled MONOCHROME1: the inversion heuristic
)


@pytest.fixture(scope="module")
def decoder(tmp_path_factory: pytest.TempPathFactory) -> Iterator[IsolatedDecoder]:
    dec = IsolatedDecoder(
        tmp_path_factory.mktemp("decode"), DecodeLimits(timeout_seconds=120, memory_bytes=2 << 30)
    )
    yield dec
    dec.close()


@pytest.fixture(scope="module")
def predictor() -> Predictor:
    return Predictor(load_bundle(SHIPPED), threads=1)


@pytest.mark.parametrize("name", CHEST)
def test_a_dicom_file_is_the_same_tensor_in_training_and_in_the_worker(
    name: str, shared_dir: Path, decoder: IsolatedDecoder, predictor: Predictor
) -> None:
    path = shared_dir / "dicom" / "chest" / name
    # The worker: the pipeline's decoder child process, then the Predictor's preparation.
    served = predictor.prepare([decoder.decode(path).pixels])[0]
    # Training: the dataset transform that CacheDataset caches, with the bundle's own preprocessing.
    cfg = {
        k: predictor.bundle.parser.get(k)
        for k in ("image_size", "num_classes", "network_def", "preprocessing")
    }
    trained_on = preprocessed(path, build_preprocessing(cfg))
    assert served.shape == trained_on.shape == (1, 128, 128)
    assert torch.equal(served, trained_on)


def test_png_input_goes_through_the_same_normalisation(shared_dir: Path, predictor: Predictor) -> None:
    path = next(iter(sorted((shared_dir / "data" / "nih-cxr14-dev" / "images").glob("*.png"))))
    with Image.open(path) as im:
        expected = display_from_pil(im)
    pixels = load_image(path)
    assert pixels.dtype == np.float32 and np.array_equal(pixels, expected)
    assert np.array_equal(read_display_file(path).pixels, pixels)
    pre = build_preprocessing(inference_config(14, 128))
    trained_on = preprocessed(path, pre)
    assert torch.equal(trained_on, predictor.prepare([pixels])[0])


def test_unreadable_files_raise_coded_errors(tmp_path: Path) -> None:
    bad_png = tmp_path / "x.png"
    bad_png.write_bytes(b"not an image")
    with pytest.raises(PixelDataError) as caught:
        read_display_file(bad_png)
    assert caught.value.reason == ReasonCode.PIXEL_DECODE_ERROR
    bad_dcm = tmp_path / "x.dcm"
    bad_dcm.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 10)
    with pytest.raises(PixelDataError):
        read_display_file(bad_dcm)
