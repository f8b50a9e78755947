"""Display pixels of a DICOM image: the rendering chain lives in `worker.imaging`, shared with training.

Kept so that ``worker.dicom.pixels`` imports go on working; new code imports `worker.imaging`.
"""

from __future__ import annotations

from worker.imaging import (
    DisplayImage,
    PixelDataError,
    codestream_size,
    inversion_score,
    looks_inverted,
    read_display_pixels,
)

__all__ = [
    "DisplayImage",
    "PixelDataError",
    "codestream_size",
    "inversion_score",
    "looks_inverted",
    "read_display_pixels",
]
