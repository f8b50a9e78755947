"""The one rendering chain: a single-frame grey DICOM image (or a PNG/JPEG) → display pixels in [0, 1],
bright = bone. The worker (``worker.dicom``, in its decoder child processes) and training
(``monai_train.data``) both read images through this module, so a DICOM file becomes the same array —
and, after the bundle's preprocessing, the same tensor — in both.

The DICOM pipeline follows the grayscale rendering chain (PS3.3 C.11): stored values → modality LUT →
VOI LUT / window → polarity (MONOCHROME1 inverted, then the inversion heuristic). Where the dataset
carries no VOI transform, a robust percentile stretch stands in for it so the model sees comparable
contrast. PNG/JPEG pixels are display values already: they are scaled by their type's range to [0, 1]
(`display_from_pil`). Resize and intensity normalisation follow in the bundle's preprocessing
(``configs/inference.json``), which both sides instantiate from the bundle.

No torch or monai here (import-linter contract): the decoder child processes stay small.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pydicom.multival
from PIL import Image
from pydicom.pixels.processing import apply_modality_lut, apply_voi, apply_voi_lut

from service.core.status import ReasonCode

__all__ = [
    "DICOM_SUFFIXES",
    "Clahe",
    "DisplayImage",
    "PixelDataError",
    "clahe",
    "codestream_size",
    "display_from_pil",
    "inversion_score",
    "is_dicom_file",
    "looks_inverted",
    "read_display_file",
    "read_display_pixels",
]

DICOM_SUFFIXES = (".dcm", ".dicom")

FloatImage = npt.NDArray[np.float32]

_GREY_INTERPRETATIONS = frozenset({"MONOCHROME1", "MONOCHROME2"})
_PIXEL_MODULE_KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation")
_PERCENTILES = (0.5, 99.5)

# "Not an image" limits. On the 1321 NIH images and the shared DICOM chest files the rendered images have
# a standard deviation of at least 0.15 and at most 65 % of their pixels in one of 64 grey bins; a blank
# or saturated rendering (a NaN rescale, a window far off the data) lies far beyond both.
_MIN_RENDERED_STD = 0.02
_MAX_BIN_FRACTION = 0.95
_HISTOGRAM_BINS = 64
# No detector produces modality values spanning more than 32 bits; a wider span is a broken rescale.
_MAX_MODALITY_SPAN = float(2**32)

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
    _check_transform_values(ds)
    try:
        stored = np.asarray(ds.pixel_array)
    except Exception as exc:  # decoders raise many types; all mean the same thing to the caller
        raise PixelDataError(ReasonCode.PIXEL_DECODE_ERROR, f"cannot decode pixel data: {exc}") from exc
    if stored.ndim != 2:
        raise PixelDataError(ReasonCode.NOT_2D_GREY, f"decoded pixel array has shape {stored.shape}")

    try:
        with np.errstate(all="ignore"):  # overflow shows up as non-finite values, checked below
            values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
        _check_modality_values(values)
        with np.errstate(all="ignore"):
            scaled = _apply_voi(values, ds)
    except PixelDataError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, NotImplementedError) as exc:
        raise PixelDataError(
            ReasonCode.PIXEL_MODULE_INCONSISTENT, f"cannot apply modality/VOI transform: {exc}"
        ) from exc

    pixels = np.clip(np.nan_to_num(scaled, nan=0.0), 0.0, 1.0).astype(np.float32)
    _check_rendered(pixels)
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

    # Encapsulated (compressed) Pixel Data has undefined length; its size says nothing about geometry,
    # but the codestream's own header does, and the decoder allocates what that header declares (a
    # 105-byte JPEG 2000 stream can declare 65000 x 65000).
    if ds["PixelData"].is_undefined_length:
        declared = codestream_size(_first_fragment(ds))
        if declared is not None and declared != (rows, columns):
            raise PixelDataError(
                ReasonCode.PIXEL_MODULE_INCONSISTENT,
                f"codestream declares {declared[0]} x {declared[1]}; Rows x Columns is {rows} x {columns}",
            )
    else:
        expected = (rows * columns * allocated + 7) // 8
        available = len(ds.PixelData)
        if available < expected:
            raise PixelDataError(
                ReasonCode.PIXEL_MODULE_INCONSISTENT,
                f"{rows} x {columns} x {allocated} bits needs {expected} bytes; Pixel Data has {available}",
            )


# Start-of-frame markers of JPEG (SOF0-3, 5-7, 9-11, 13-15) and JPEG-LS (SOF55).
_SOF_MARKERS = frozenset(
    {*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7}
)


def codestream_size(stream: bytes) -> tuple[int, int] | None:
    """(rows, columns) a JPEG, JPEG-LS or JPEG 2000 codestream declares; None for other data (RLE) or
    a header too short to tell (the decoder then fails on it)."""
    if stream[:4] == b"\xff\x4f\xff\x51" and len(stream) >= 24:  # J2K: SOC, SIZ (ISO 15444-1 A.5.1)
        x_size, y_size, x_offset, y_offset = struct.unpack(">4L", stream[8:24])
        return y_size - y_offset, x_size - x_offset
    if stream[:2] != b"\xff\xd8":  # not JPEG / JPEG-LS (ISO 10918-1 B.2, 14495-1 C.2.2)
        return None
    pos = 2
    while pos + 4 <= len(stream):
        if stream[pos] != 0xFF:
            return None
        marker = stream[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        (length,) = struct.unpack(">H", stream[pos + 2 : pos + 4])
        if marker in _SOF_MARKERS:
            if pos + 9 > len(stream):
                return None
            rows, columns = struct.unpack(">HH", stream[pos + 5 : pos + 9])
            return int(rows), int(columns)
        pos += 2 + length
    return None


def _first_fragment(ds: pydicom.Dataset) -> bytes:
    """The first bytes of the first frame's first fragment (the Basic Offset Table skipped)."""
    data = bytes(ds.PixelData)
    pos = 0
    for _ in range(2):  # the offset table item, then the first fragment
        if len(data) < pos + 8 or data[pos : pos + 4] != b"\xfe\xff\x00\xe0":
            return b""
        (length,) = struct.unpack("<L", data[pos + 4 : pos + 8])
        if pos == 0:
            pos = 8 + length
            continue
        return data[pos + 8 : pos + 8 + min(length, 1 << 16)]
    return b""


def _first_number(ds: pydicom.Dataset, keyword: str) -> float | None:
    """The first value of a numeric (DS/IS/FD) attribute as a float; None when absent or empty."""
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        if not value:
            return None
        value = value[0]
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")  # present but not a number: as unusable as NaN


def _check_transform_values(ds: pydicom.Dataset) -> None:
    """Rescale and window values the rendering chain would turn into a blank or garbage image."""
    slope = _first_number(ds, "RescaleSlope")
    intercept = _first_number(ds, "RescaleIntercept")
    if slope is not None and (not math.isfinite(slope) or slope == 0.0):
        raise PixelDataError(ReasonCode.RESCALE_INVALID, "Rescale Slope is not a finite non-zero number")
    if intercept is not None and not math.isfinite(intercept):
        raise PixelDataError(ReasonCode.RESCALE_INVALID, "Rescale Intercept is not a finite number")
    if ds.get("VOILUTSequence"):
        return  # the LUT is used, not the window
    center = _first_number(ds, "WindowCenter")
    width = _first_number(ds, "WindowWidth")
    if center is None or width is None:
        return  # no window: the percentile stretch stands in
    if not (math.isfinite(center) and math.isfinite(width)) or width <= 0.0:
        raise PixelDataError(ReasonCode.WINDOW_INVALID, "Window Center/Width is not a finite window")
    function = str(ds.get("VOILUTFunction") or "LINEAR").strip().upper()
    if function == "LINEAR" and width < 1.0:  # PS3.3 C.11.2.1.2.1
        raise PixelDataError(ReasonCode.WINDOW_INVALID, "a LINEAR window narrower than 1")


def _check_modality_values(values: npt.NDArray[np.float64]) -> None:
    if not np.isfinite(values).all():
        raise PixelDataError(ReasonCode.RESCALE_INVALID, "the modality transform gives non-finite values")
    span = float(values.max() - values.min()) if values.size else 0.0
    if not math.isfinite(span) or span > _MAX_MODALITY_SPAN:
        raise PixelDataError(ReasonCode.DYNAMIC_RANGE_ABSURD, "modality values span more than 32 bits")


def _check_rendered(pixels: FloatImage) -> None:
    """A rendered image that is one grey (or nearly: saturated by the window) carries no anatomy."""
    if float(pixels.std()) < _MIN_RENDERED_STD:
        raise PixelDataError(ReasonCode.IMAGE_BLANK, "the rendered image is constant")
    counts, _ = np.histogram(pixels, bins=_HISTOGRAM_BINS, range=(0.0, 1.0))
    if float(counts.max()) >= _MAX_BIN_FRACTION * pixels.size:
        raise PixelDataError(ReasonCode.IMAGE_BLANK, "the rendered image is nearly constant")


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


# ---------------------------------------------------------------------------------------------- files


def read_display_file(path: Path | str, *, auto_invert: bool = True) -> DisplayImage:
    """Display pixels of an image file: DICOM (by suffix, or by its DICM preamble) through
    `read_display_pixels`, anything else through Pillow and `display_from_pil`."""
    p = Path(path)
    if is_dicom_file(p):
        try:
            ds = pydicom.dcmread(str(p))
        except Exception as exc:  # pydicom raises many types for a file it cannot parse
            raise PixelDataError(ReasonCode.DATASET_MALFORMED, f"cannot read {p.name}: {exc}") from exc
        return read_display_pixels(ds, auto_invert=auto_invert)
    try:
        with Image.open(p) as im:
            pixels = display_from_pil(im)
    except PixelDataError:
        raise
    except Exception as exc:  # Pillow: UnidentifiedImageError, OSError on truncated files, ...
        raise PixelDataError(ReasonCode.PIXEL_DECODE_ERROR, f"cannot read {p.name}: {exc}") from exc
    return DisplayImage(pixels=pixels, inverted_by_label=False, inverted_by_heuristic=False)


def is_dicom_file(path: Path) -> bool:
    """A DICOM file by its suffix, or by the DICM magic after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def display_from_pil(im: Image.Image) -> FloatImage:
    """A PNG/JPEG (any Pillow mode) as 2-D float32 in [0, 1], MONOCHROME2 sense.

    Grey values are scaled by their type's full range (8 or 16 bits), as a viewer shows them; colour
    becomes ITU-R 601 luma; alpha is ignored (NIH's few RGBA images are fully opaque).
    """
    mode = im.mode
    if mode in {"I;16", "I;16B", "I;16L", "I;16N"}:
        arr = np.asarray(im, dtype=np.float64) / 65535.0
    elif mode == "I":
        # Pillow opens many 16-bit PNGs as 32-bit "I"; values above 16 bits would be unusual.
        raw = np.asarray(im, dtype=np.float64)
        arr = raw / (65535.0 if raw.max(initial=0) <= 65535 else float(raw.max()))
    elif mode == "F":
        raw = np.asarray(im, dtype=np.float64)
        lo, hi = float(raw.min(initial=0.0)), float(raw.max(initial=0.0))
        arr = raw if lo >= 0.0 and hi <= 1.0 else (raw - lo) / max(hi - lo, 1e-12)
    elif mode == "L":
        arr = np.asarray(im, dtype=np.float64) / 255.0
    else:
        grey = (
            im.convert("RGB").convert("L")
            if mode in {"P", "PA", "CMYK", "YCbCr", "LAB", "HSV"}
            else im.convert("L")
        )
        arr = np.asarray(grey, dtype=np.float64) / 255.0
    if arr.ndim != 2:
        raise PixelDataError(ReasonCode.NOT_2D_GREY, f"image of mode {mode} did not become 2-D ({arr.shape})")
    return np.clip(arr, 0.0, 1.0).astype(np.float32)


# ---------------------------------------------------------------------------------------------- CLAHE


def clahe(image: npt.ArrayLike, *, tiles: int = 8, clip_limit: float = 2.0, bins: int = 256) -> FloatImage:
    """Contrast-limited adaptive histogram equalisation (Zuiderveld 1994) of a display image in [0, 1].

    The image is cut into ``tiles`` × ``tiles`` tiles; each tile's histogram is clipped at ``clip_limit``
    times its mean bin count (the excess spread evenly over all bins, as OpenCV does), its cumulative
    histogram is the tile's grey mapping, and every pixel takes the bilinear blend of the mappings of the
    four tiles whose centres surround it (the nearest ones at the borders). A leading axis of length 1
    (channel-first) is kept. Numpy only, so the worker's decoder processes and training run the same code.
    """
    arr = np.asarray(image, dtype=np.float32)
    squeeze = arr.ndim == 3 and arr.shape[0] == 1
    img = arr[0] if squeeze else arr
    if img.ndim != 2:
        raise ValueError(f"CLAHE needs a 2-D image, got shape {arr.shape}")
    rows, cols = img.shape
    tiles_y, tiles_x = min(tiles, rows), min(tiles, cols)
    q = np.clip((np.nan_to_num(img) * bins).astype(np.int64), 0, bins - 1)
    ty = np.minimum(np.arange(rows) * tiles_y // rows, tiles_y - 1)  # tile of each row / column
    tx = np.minimum(np.arange(cols) * tiles_x // cols, tiles_x - 1)
    tile = ty[:, None] * tiles_x + tx[None, :]
    hist = np.bincount((tile * bins + q).ravel(), minlength=tiles_y * tiles_x * bins)
    hist = hist.reshape(tiles_y * tiles_x, bins).astype(np.float64)
    counts = hist.sum(axis=1, keepdims=True)
    limit = np.maximum(clip_limit * counts / bins, 1.0)
    excess = np.maximum(hist - limit, 0.0).sum(axis=1, keepdims=True)
    hist = np.minimum(hist, limit) + excess / bins
    maps = (np.cumsum(hist, axis=1) / np.maximum(counts, 1.0)).reshape(tiles_y, tiles_x, bins)
    y0, y1, wy = _tile_neighbours(rows, tiles_y)
    x0, x1, wx = _tile_neighbours(cols, tiles_x)
    top = maps[y0[:, None], x0[None, :], q] * (1 - wx) + maps[y0[:, None], x1[None, :], q] * wx
    bottom = maps[y1[:, None], x0[None, :], q] * (1 - wx) + maps[y1[:, None], x1[None, :], q] * wx
    out: FloatImage = (top * (1 - wy[:, None]) + bottom * wy[:, None]).astype(np.float32)
    return np.asarray(out[None]) if squeeze else out


def _tile_neighbours(
    n: int, tiles: int
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64], npt.NDArray[np.float64]]:
    """For each of ``n`` pixels along an axis: the tiles whose centres lie before/after it and the weight
    of the latter (clamped to the first/last tile at the borders)."""
    pos = (np.arange(n) + 0.5) * tiles / n - 0.5  # in units of tiles, 0 = first tile's centre
    lo = np.clip(np.floor(pos), 0, tiles - 1).astype(np.int64)
    hi = np.minimum(lo + 1, tiles - 1)
    weight = np.clip(pos - lo, 0.0, 1.0)
    return lo, hi, weight


class Clahe:
    """CLAHE as a step of the bundle's preprocessing (``configs/inference.json``: ``worker.imaging.Clahe``),
    so the worker and training apply the one implementation with the one set of parameters."""

    def __init__(self, tiles: int = 8, clip_limit: float = 2.0) -> None:
        self.tiles = tiles
        self.clip_limit = clip_limit

    def __call__(self, image: npt.ArrayLike) -> FloatImage:
        return clahe(image, tiles=self.tiles, clip_limit=self.clip_limit)
