"""Turn a single-frame grey DICOM image into display pixels in [0, 1], bright = bone.

The pipeline follows the DICOM grayscale rendering chain (PS3.3 C.11): stored values →
modality LUT → VOI LUT / window → polarity (MONOCHROME1 inverted). Where the dataset carries no
VOI transform, a robust percentile stretch stands in for it so the model sees comparable contrast.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_voi_lut

from service.core.status import ReasonCode

__all__ = [
    "DisplayImage",
    "PixelDataError",
    "inversion_score",
    "looks_inverted",
    "read_display_pixels",
]

FloatImage = npt.NDArray[np.float32]

_GREY_INTERPRETATIONS = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PIXEL_MODULE_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation")
_PERCENTILES = (0.5, 99.5)

# Heuristic geometry, as fractions of the body bounding box (see `inversion_score`).
_SCORE_SIDE = 128
_SCORE_BLOCK = 8
# Scores within ±_SCORE_DEAD_ZONE are treated as "cannot tell": better to leave an image as labelled
# than to flip it on weak evidence. On the 321 NIH dev images the lowest normal score is ≈ 0.13.
_SCORE_DEAD_ZONE = 0.05


class PixelDataError(ValueError):
    """The pixel data cannot be turned into a single 2-D grey image.

    `reason` is a `ReasonCode` (a `str`), so callers can record it as the job's reason directly.
    """

    def __init__(self, reason: ReasonCode, message: str) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason: ReasonCode = reason


@dataclass(frozen=True)
class DisplayImage:
    """Display pixels plus how their polarity was decided.

    `pixels` is float32, shape (Rows, Columns), values in [0, 1], MONOCHROME2 sense.
    """

    pixels: FloatImage
    inverted_by_label: bool
    inverted_by_heuristic: bool


def read_display_pixels(ds: pydicom.Dataset, *, auto_invert: bool = True) -> DisplayImage:
    """Decode `ds` and return its display pixels in [0, 1], bone bright.

    With `auto_invert`, an image that still looks inverted after the MONOCHROME1 label was honoured
    (see `looks_inverted`) is flipped too, and `inverted_by_heuristic` says so.
    """
    _check_pixel_module(ds)
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types; all mean the same thing to the caller
        raise PixelDataError(ReasonCode.PIXEL_DECODE_ERROR, f"cannot decode pixel data: {exc}") from exc
    if stored.ndim != 2:
        raise PixelDataError(ReasonCode.NOT_2D_GREY, f"decoded pixel array has shape {stored.shape}")

    try:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        scaled = _apply_voi(values, ds)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError) as exc:
        raise PixelDataError(
            ReasonCode.PIXEL_MODULE_INCONSISTENT, f"cannot apply modality/VOI transform: {exc}"
        ) from exc

    pixels = np.clip(scaled, 0.0, 1.0).astype(np.float32)
    by_label = str(ds.PhotometricInterpretation).strip() == "MONOCHROME1"
    if by_label:
        pixels = 1.0 - pixels
    by_heuristic = auto_invert and looks_inverted(pixels)
    if by_heuristic:
        pixels = 1.0 - pixels
    return DisplayImage(pixels=pixels, inverted_by_label=by_label, inverted_by_heuristic=by_heuristic)


def looks_inverted(img: npt.NDArray[np.floating] | npt.NDArray[np.integer]) -> bool:
    """True when a frontal chest image in [0, 1] looks like bone = dark.

    Only fires on clear evidence (`inversion_score` below a dead zone); ambiguous images stay as
    they are.
    """
    return inversion_score(img) < -_SCORE_DEAD_ZONE


def inversion_score(img: npt.NDArray[np.floating] | npt.NDArray[np.integer]) -> float:
    """Signed evidence that a frontal chest image is in normal (bone bright) sense.

    Positive: normal; negative: inverted. The score is exactly antisymmetric (score(1 - x) ==
    -score(x)), so one threshold serves both directions. Inside the body's bounding box (found from
    local texture, which does not depend on polarity, so black air or white collimation borders do
    not matter) it adds three contrasts against the lung fields, which are dark in a normal image:
    the mediastinum/spine column, the heart base/diaphragm band and the upper abdomen.
    """
    arr = np.asarray(img, dtype=np.float32)
    if arr.ndim != 2 or min(arr.shape) < 16:
        return 0.0
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 0.0:
        return 0.0
    arr = (arr - lo) / (hi - lo)
    small = np.asarray(
        Image.fromarray(arr).resize((_SCORE_SIDE, _SCORE_SIDE), Image.Resampling.BOX),
        dtype=np.float32,
    )
    y0, y1, x0, x1 = _body_box(small)
    body = small[y0:y1, x0:x1]

    def region(top: float, bottom: float, left: float, right: float) -> npt.NDArray[np.float32]:
        h, w = body.shape
        r0, c0 = int(top * h), int(left * w)
        return body[r0 : max(int(bottom * h), r0 + 1), c0 : max(int(right * w), c0 + 1)]

    lungs = float(
        np.concatenate(
            [region(0.25, 0.70, 0.15, 0.35).ravel(), region(0.25, 0.70, 0.65, 0.85).ravel()]
        ).mean()
    )
    mediastinum = float(region(0.10, 0.90, 0.45, 0.55).mean())
    heart_base = float(region(0.70, 0.85, 0.20, 0.80).mean())
    abdomen = float(region(0.85, 1.00, 0.30, 0.70).mean())
    return (mediastinum - lungs) + (heart_base - lungs) + (abdomen - lungs)


def _body_box(small: npt.NDArray[np.float32]) -> tuple[int, int, int, int]:
    """Bounding box (y0, y1, x0, x1) of the textured (non-flat) blocks, robust to stray markers."""
    side = small.shape[0]
    grid = side // _SCORE_BLOCK
    blocks = small[: grid * _SCORE_BLOCK, : grid * _SCORE_BLOCK].reshape(
        grid, _SCORE_BLOCK, grid, _SCORE_BLOCK
    )
    spread = blocks.std(axis=(1, 3))
    nonzero = spread[spread > 0]
    threshold = max(0.25 * float(np.median(nonzero)) if nonzero.size else 0.0, 0.01)
    ys, xs = np.nonzero(spread > threshold)
    if xs.size < 4:
        return 0, side, 0, side
    # Quantiles rather than min/max: burned-in letters in the background are few blocks.
    bx0, bx1 = np.quantile(xs, (0.05, 0.95))
    by0, by1 = np.quantile(ys, (0.05, 0.95))
    return (
        int(by0) * _SCORE_BLOCK,
        (int(by1) + 1) * _SCORE_BLOCK,
        int(bx0) * _SCORE_BLOCK,
        (int(bx1) + 1) * _SCORE_BLOCK,
    )


def _check_pixel_module(ds: pydicom.Dataset) -> None:
    """Reject what cannot be one grey frame before spending time on decoding."""
    if "PixelData" not in ds:
        if any(keyword in ds for keyword in _PIXEL_MODULE_KEYWORDS):
            raise PixelDataError(
                ReasonCode.PIXEL_MODULE_INCONSISTENT, "Image Pixel module without Pixel Data"
            )
        raise PixelDataError(ReasonCode.NOT_IMAGE_OBJECT, "dataset has no Pixel Data")
    missing = [keyword for keyword in _PIXEL_MODULE_KEYWORDS if ds.get(keyword) is None]
    if missing:
        raise PixelDataError(ReasonCode.PIXEL_MODULE_INCONSISTENT, f"missing {', '.join(missing)}")

    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip()
    if samples != 1 or photometric not in _GREY_INTERPRETATIONS:
        raise PixelDataError(
            ReasonCode.NOT_2D_GREY,
            f"SamplesPerPixel {samples}, PhotometricInterpretation {photometric or '(none)'}",
        )
    frames = _number_of_frames(ds)
    if frames != 1:
        raise PixelDataError(ReasonCode.NOT_2D_GREY, f"{frames} frames; one expected")

    rows, columns = int(ds.Rows), int(ds.Columns)
    allocated, stored, high_bit = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.HighBit)
    if rows < 1 or columns < 1:
        raise PixelDataError(ReasonCode.PIXEL_MODULE_INCONSISTENT, f"{rows} x {columns} pixels")
    if (
        allocated not in (1, 8, 16, 32)
        or not 1 <= stored <= allocated
        or not stored - 1 <= high_bit < allocated
    ):
        raise PixelDataError(
            ReasonCode.PIXEL_MODULE_INCONSISTENT,
            f"BitsAllocated {allocated}, BitsStored {stored}, HighBit {high_bit}",
        )

    # Encapsulated (compressed) Pixel Data has undefined length; its size says nothing about geometry.
    if not ds["PixelData"].is_undefined_length:
        expected = (rows * columns * allocated + 7) // 8
        available = len(ds.PixelData)
        if available < expected:
            raise PixelDataError(
                ReasonCode.PIXEL_MODULE_INCONSISTENT,
                f"{rows} x {columns} x {allocated} bits needs {expected} bytes; Pixel Data has {available}",
            )


def _number_of_frames(ds: pydicom.Dataset) -> int:
    value = ds.get("NumberOfFrames")
    if value in (None, ""):
        return 1
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise PixelDataError(ReasonCode.PIXEL_MODULE_INCONSISTENT, f"NumberOfFrames {value!r}") from exc


def _apply_voi(values: npt.NDArray[np.float64], ds: pydicom.Dataset) -> npt.NDArray[np.float64]:
    """Map modality values to [0, 1] with the dataset's first VOI transform, else a percentile stretch."""
    voi_items = ds.get("VOILUTSequence")
    if voi_items and voi_items[0].get("LUTDescriptor") and voi_items[0].get("LUTData") is not None:
        # The LUT is indexed by integer values; apply_voi takes the first item, which is ours.
        mapped = np.asarray(apply_voi(np.rint(values).astype(np.int64), ds, index=0), np.float64)
        # Normalise by the LUT's own output range: LUT Descriptor bit depths often overstate the data.
        # Feeding every index through pydicom reads the table however it is encoded (US or OW).
        entries, first_mapped = (
            int(voi_items[0].LUTDescriptor[0]) or 65536,
            int(voi_items[0].LUTDescriptor[1]),
        )
        table = np.asarray(
            apply_voi(np.arange(first_mapped, first_mapped + entries, dtype=np.int64), ds, index=0),
            np.float64,
        )
        return _stretch(mapped, float(table.min()), float(table.max()))
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        windowed = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=False), np.float64)
        # pydicom maps the window onto the stored-value range; probing with ±inf gives that range
        # exactly (all three VOI LUT functions saturate there).
        bounds = np.asarray(
            apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0, prefer_lut=False), np.float64
        )
        return _stretch(windowed, float(bounds[0]), float(bounds[1]))
    lo, hi = np.percentile(values, _PERCENTILES)
    return _stretch(values, float(lo), float(hi))


def _stretch(values: npt.NDArray[np.float64], lo: float, hi: float) -> npt.NDArray[np.float64]:
    if not np.isfinite(lo) or not np.isfinite(hi) or hi <= lo:
        return np.zeros_like(values)
    return (values - lo) / (hi - lo)
