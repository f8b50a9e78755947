"""The job page's images as PNG: the heatmap Secondary Capture and a thumbnail of the source X-ray."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import Dataset, dcmread
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut

PNG_MAX_SIDE = 1600
SOURCE_MAX_SIDE = 512  # the job page's thumbnail of an analysed image
_STRETCH_PERCENTILES = (0.5, 99.5)


class SourceImageError(ValueError):
    """The spooled source image cannot be rendered (unreadable file, pixel data we cannot decode)."""


def heatmap_png(path: Path, max_side: int = PNG_MAX_SIDE) -> bytes:
    """The heatmap Secondary Capture's pixels as a PNG (downscaled to ``max_side``)."""
    ds = dcmread(path)
    pixels = ds.pixel_array
    if pixels.dtype != np.uint8:
        pixels = _to_uint8(pixels)
    img = Image.fromarray(pixels)  # (rows, columns, 3) is RGB, (rows, columns) greyscale
    img.thumbnail((max_side, max_side))
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)
    return out.getvalue()


def thumbnail_size(rows: int, columns: int, max_side: int = SOURCE_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of a source image's thumbnail: the aspect kept, the long side at most max_side."""
    scale = min(1.0, max_side / max(rows, columns, 1))
    return max(1, round(columns * scale)), max(1, round(rows * scale))


def source_png(path: Path, max_side: int = SOURCE_MAX_SIDE, *, invert: bool = False) -> bytes:
    """A downscaled greyscale PNG of a source X-ray, bone bright.

    Modality LUT, then the image's own window (or a percentile stretch without one), then MONOCHROME1
    inverted; ``invert`` flips it once more (the worker's heuristic found the image stored inverted).
    The first frame of a multi-frame image; colour images are shown as they are, in grey.
    """
    try:
        ds = dcmread(path)
        stored = np.asarray(ds.pixel_array)
        samples = int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames > 1:
            stored = stored[0]
        if samples > 1:
            grey = np.asarray(Image.fromarray(_to_uint8(stored)).convert("L"), dtype=np.float64)
        else:
            grey = _display(np.asarray(apply_modality_lut(stored, ds), dtype=np.float64), ds)
    except SourceImageError:
        raise
    except Exception as exc:  # codecs and malformed pixel modules raise many types; all mean "cannot show"
        raise SourceImageError(f"cannot render the source image: {type(exc).__name__}") from exc
    if grey.ndim != 2 or grey.size == 0:
        raise SourceImageError(f"unexpected pixel array shape {grey.shape}")
    if samples == 1 and str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        grey = 255.0 - grey
    if invert:
        grey = 255.0 - grey
    img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    size = thumbnail_size(img.height, img.width, max_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _display(values: Any, ds: Dataset) -> Any:
    """Modality values mapped to 0..255 by the first window of the image, else a percentile stretch."""
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        windowed = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=False), dtype=np.float64)
        # pydicom maps the window onto the stored-value range; ±inf gives that range's ends.
        ends = np.asarray(apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0, prefer_lut=False))
        lo, hi = float(ends[0]), float(ends[1])
    else:
        windowed = values
        lo, hi = (float(v) for v in np.percentile(values, _STRETCH_PERCENTILES))
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros_like(values)
    return np.clip((windowed - lo) / (hi - lo), 0.0, 1.0) * 255.0


def _to_uint8(pixels: Any) -> Any:
    arr = np.asarray(pixels, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
    return scaled.astype(np.uint8)
