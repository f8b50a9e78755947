"""Where a finding is: the outline of its heatmap region in source-image pixel coordinates.

One definition serves every output that shows a place (the SR's image regions, the SC's outlines, the
optional GSPS and the dashboard), so they cannot disagree. The region of a finding is the connected part
of its heatmap that contains the heatmap's peak and reaches at least ``OUTLINE_LEVEL`` of that peak
(heatmaps are scaled to [0, 1] per finding, so the level is relative to the finding's own maximum). Its
outer boundary is traced on a working grid, simplified to at most ``MAX_POINTS`` vertices and scaled to
the source image; a region too small to outline (fewer than three distinct vertices) becomes its
bounding box.

Coordinates follow DICOM's 2-D pixel convention (PS3.3 C.18.6.1.1): (column, row), the top-left corner
of the top-left pixel at (0, 0), so a pixel's centre lies at (c + 0.5, r + 0.5).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np
import numpy.typing as npt
from PIL import Image

__all__ = ["MAX_POINTS", "OUTLINE_LEVEL", "Region", "RegionKind", "finding_region", "scale_polygon"]

OUTLINE_LEVEL = 0.5  # fraction of the finding's heatmap maximum the outline follows
MAX_POINTS = 48  # vertices of a closed outline, the repeated first point not counted
_GRID = 96  # long side of the working grid the heatmap is traced on
_MIN_PEAK = 1e-6  # an all-zero heatmap has no place

Point = tuple[float, float]

# Moore neighbourhood, clockwise on screen (rows grow downwards), starting west.
_NEIGHBOURS = ((0, -1), (-1, -1), (-1, 0), (-1, 1), (0, 1), (1, 1), (1, 0), (1, -1))
_DIRECTION = {offset: index for index, offset in enumerate(_NEIGHBOURS)}


class RegionKind(StrEnum):
    OUTLINE = "outline"  # traced boundary of the heatmap region
    BOX = "box"  # bounding box, where the outline was degenerate


@dataclass(frozen=True)
class Region:
    """A finding's region on the source image; ``polygon`` is closed (its last point is its first)."""

    label: str
    kind: RegionKind
    polygon: tuple[Point, ...]
    peak: Point  # where the heatmap is highest: where a label or marker belongs
    level: float = OUTLINE_LEVEL

    def as_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "kind": str(self.kind),
            "level": self.level,
            "peak": [round(v, 1) for v in self.peak],
            "polygon": [[round(x, 1), round(y, 1)] for x, y in self.polygon],
        }


def finding_region(
    label: str,
    heatmap: npt.NDArray[np.floating],
    rows: int,
    columns: int,
    *,
    level: float = OUTLINE_LEVEL,
    max_points: int = MAX_POINTS,
) -> Region | None:
    """The region of ``label``'s ``heatmap`` (any resolution, covering the whole image) on a
    ``rows`` × ``columns`` image; None when the heatmap is empty or not finite anywhere."""
    if rows < 1 or columns < 1:
        raise ValueError(f"image size must be positive, got {rows} x {columns}")
    if not 0.0 < level < 1.0:
        raise ValueError("level must lie strictly between 0 and 1")
    heat = np.asarray(heatmap, dtype=np.float32)
    heat = heat.reshape([n for n in heat.shape if n != 1] or [1, 1])
    if heat.ndim != 2:
        raise ValueError(f"heatmap must be 2-D, got shape {np.shape(heatmap)}")
    heat = np.nan_to_num(heat, nan=0.0, posinf=0.0, neginf=0.0)
    grid_rows, grid_cols = _grid_shape(rows, columns)
    work = np.asarray(
        Image.fromarray(np.ascontiguousarray(heat)).resize((grid_cols, grid_rows), Image.Resampling.BILINEAR),
        dtype=np.float32,
    )
    peak_value = float(work.max())
    if not math.isfinite(peak_value) or peak_value <= _MIN_PEAK:
        return None
    peak_row, peak_col = np.unravel_index(int(np.argmax(work)), work.shape)
    mask = _component(work >= level * peak_value, int(peak_row), int(peak_col))

    sx, sy = columns / grid_cols, rows / grid_rows
    peak = _clip(((int(peak_col) + 0.5) * sx, (int(peak_row) + 0.5) * sy), rows, columns)
    boundary = _simplify(_trace(mask), max_points)
    points = [_clip(((c + 0.5) * sx, (r + 0.5) * sy), rows, columns) for r, c in boundary]
    if len(set(points)) >= 3 and abs(_area(points)) > 0.0:
        return Region(label, RegionKind.OUTLINE, (*points, points[0]), peak, level)
    # Degenerate outline (a point or a line of cells): the cells' bounding box, clipped to the image.
    found_rows, found_cols = np.nonzero(mask)
    left, right = float(found_cols.min()) * sx, float(found_cols.max() + 1) * sx
    top, bottom = float(found_rows.min()) * sy, float(found_rows.max() + 1) * sy
    box = [(left, top), (right, top), (right, bottom), (left, bottom)]
    box = [_clip(point, rows, columns) for point in box]
    return Region(label, RegionKind.BOX, (*box, box[0]), peak, level)


def scale_polygon(polygon: Sequence[Point], x_factor: float, y_factor: float) -> list[Point]:
    """``polygon`` in another pixel grid of the same picture (e.g. a resized rendering)."""
    return [(x * x_factor, y * y_factor) for x, y in polygon]


def _grid_shape(rows: int, columns: int) -> tuple[int, int]:
    scale = _GRID / max(rows, columns)
    return max(1, min(rows, round(rows * scale))), max(1, min(columns, round(columns * scale)))


def _component(mask: npt.NDArray[np.bool_], row: int, col: int) -> npt.NDArray[np.bool_]:
    """The 8-connected part of ``mask`` that contains (row, col): the seed grown inside the mask."""
    component = np.zeros_like(mask)
    component[row, col] = True
    rows, cols = mask.shape
    while True:
        padded = np.pad(component, 1)
        grown = component.copy()
        for dr, dc in _NEIGHBOURS:
            grown |= padded[1 + dr : 1 + dr + rows, 1 + dc : 1 + dc + cols]
        grown &= mask
        if np.array_equal(grown, component):
            return component
        component = grown


def _trace(mask: npt.NDArray[np.bool_]) -> list[tuple[int, int]]:
    """Outer boundary cells of a connected ``mask``, clockwise (Moore tracing, Jacob's stop)."""
    padded = np.pad(mask, 1)
    found = np.argwhere(padded)
    start = (int(found[0][0]), int(found[0][1]))  # topmost, then leftmost: its west neighbour is empty
    back = (start[0], start[1] - 1)
    current = start
    path = [start]
    for _ in range(8 * padded.size):
        origin = _DIRECTION[(back[0] - current[0], back[1] - current[1])]
        for step in range(1, 9):
            dr, dc = _NEIGHBOURS[(origin + step) % 8]
            candidate = (current[0] + dr, current[1] + dc)
            if padded[candidate]:
                pr, pc = _NEIGHBOURS[(origin + step - 1) % 8]
                back = (current[0] + pr, current[1] + pc)
                current = candidate
                break
        else:
            break  # an isolated cell
        if current == start and back == (start[0], start[1] - 1):
            break
        path.append(current)
    return [(r - 1, c - 1) for r, c in path]


def _simplify(path: list[tuple[int, int]], max_points: int) -> list[tuple[int, int]]:
    """Douglas–Peucker on the closed ``path`` with a growing tolerance until it has ≤ max_points."""
    if len(path) < 4:
        return path
    tolerance = 0.5  # below a cell: drops only the collinear steps of a straight edge
    simplified = _douglas_peucker_closed(path, tolerance)
    while len(simplified) > max_points:
        tolerance *= 1.5
        simplified = _douglas_peucker_closed(path, tolerance)
    return simplified


def _douglas_peucker_closed(path: list[tuple[int, int]], tolerance: float) -> list[tuple[int, int]]:
    # Split the loop at its start and the point farthest from it, then simplify both halves.
    far = max(range(len(path)), key=lambda i: (path[i][0] - path[0][0]) ** 2 + (path[i][1] - path[0][1]) ** 2)
    first = _douglas_peucker(path[: far + 1], tolerance)
    second = _douglas_peucker([*path[far:], path[0]], tolerance)
    return first[:-1] + second[:-1]


def _douglas_peucker(points: list[tuple[int, int]], tolerance: float) -> list[tuple[int, int]]:
    keep = [False] * len(points)
    keep[0] = keep[-1] = True
    stack = [(0, len(points) - 1)]
    while stack:
        lo, hi = stack.pop()
        (r0, c0), (r1, c1) = points[lo], points[hi]
        length = math.hypot(r1 - r0, c1 - c0)
        worst, worst_at = 0.0, -1
        for i in range(lo + 1, hi):
            r, c = points[i]
            if length == 0.0:
                distance = math.hypot(r - r0, c - c0)
            else:
                distance = abs((r1 - r0) * (c0 - c) - (r0 - r) * (c1 - c0)) / length
            if distance > worst:
                worst, worst_at = distance, i
        if worst > tolerance:
            keep[worst_at] = True
            stack.extend(((lo, worst_at), (worst_at, hi)))
    return [point for point, kept in zip(points, keep, strict=True) if kept]


def _area(points: Sequence[Point]) -> float:
    return 0.5 * sum(
        x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(points, [*points[1:], points[0]], strict=True)
    )


def _clip(point: Point, rows: int, columns: int) -> Point:
    x, y = point
    return (round(min(max(float(x), 0.0), float(columns)), 2), round(min(max(float(y), 0.0), float(rows)), 2))
