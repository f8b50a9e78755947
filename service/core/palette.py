"""Colours of the finding regions, shared by the heatmap SC and the dashboard so that region n has the
same colour in both: distinct hues that stand out on a grey X-ray, in region order (highest score first)."""

from __future__ import annotations

from typing import Final

RGB = tuple[int, int, int]

REGION_COLOURS: Final[tuple[RGB, ...]] = (
    (235, 30, 30),
    (0, 200, 255),
    (120, 255, 40),
    (255, 160, 0),
    (220, 80, 255),
    (255, 255, 60),
    (0, 230, 170),
    (255, 120, 180),
)


def region_colour(number: int) -> RGB:
    """The colour of region ``number`` (1-based); colours repeat beyond eight regions."""
    return REGION_COLOURS[(int(number) - 1) % len(REGION_COLOURS)]


def region_colour_hex(number: int) -> str:
    red, green, blue = region_colour(number)
    return f"#{red:02x}{green:02x}{blue:02x}"
