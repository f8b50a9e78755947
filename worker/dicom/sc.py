"""Heatmap Secondary Capture: what the measurement report says, burned into a picture.

Layout: the display image (scaled so the whole picture fits `max_side`) on the left, with a heat
overlay, the region outline (worker.regions, the same polygons as the SR's image regions) and a number
for each finding present at its operating point; a black legend panel on the right with the
disclaimer, a line saying how many findings are above their operating points (or that none is), the
14 values in a compact table (number, name, value, operating point; present rows in their colour), the
heat scale and the algorithm. Values are called probabilities only for a calibrated bundle. Only
algorithm information is written into the pixels, never anything from the patient/study header. The
image part keeps the source's orientation and aspect, so Patient Orientation and (scaled) Pixel
Spacing still hold for it.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
import numpy.typing as npt
import pydicom
from PIL import Image, ImageDraw, ImageFont
from pydicom.sr.codedict import codes
from pydicom.uid import JPEG2000, JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLSNearLossless

from service.core.palette import RGB, region_colour
from worker.dicom.codes import display_name
from worker.dicom.source import require_analysed
from worker.dicom.sr import FindingResult, OutputContext, source_header
from worker.regions import Region, scale_polygon

__all__ = ["HEATMAP_SERIES_SUFFIX", "build_heatmap_sc", "render_heatmap_rgb"]

HEATMAP_SERIES_SUFFIX = "AI heatmap - not for diagnostic use"
_DISCLAIMER_LINES = ("AI-generated heatmap", "NOT for diagnostic use")

# Region n has the same colour here as on the dashboard; they repeat beyond eight (rare at sane thresholds).
_GREY: RGB = (170, 170, 170)
_MIN_HEAT = 0.2  # below this, no colour at all: weak activations are noise, not localisation
_MAX_ALPHA = 0.45
_PANEL_RATIO = 0.36  # legend panel width relative to image height
_MIN_LONG_SIDE = 1024  # small sources are enlarged so the legend stays legible
# Names are copied verbatim from the source; highdicom's advice on their form is only log noise here.
_PERSON_NAME_WARNING = ".*unlikely to represent the intended person name.*"
_LOSSY_METHODS = {
    JPEGBaseline8Bit: "ISO_10918_1",
    JPEGExtended12Bit: "ISO_10918_1",
    JPEG2000: "ISO_15444_1",
    JPEGLSNearLossless: "ISO_14495_1",
}


@dataclass(frozen=True)
class _Rendered:
    rgb: npt.NDArray[np.uint8]
    image_rows: int
    image_columns: int


def render_heatmap_rgb(
    image: npt.NDArray[np.floating],
    heatmaps: Mapping[str, npt.NDArray[np.floating]],
    findings: Sequence[FindingResult],
    regions: Sequence[Region],
    *,
    calibrated: bool = False,
    caption: str = "",
    max_side: int = 2048,
) -> npt.NDArray[np.uint8]:
    """Render the heatmap picture as an (rows, columns, 3) uint8 RGB array.

    `image`: display pixels in [0, 1] (bone bright); `heatmaps`: NIH label → 2-D heat in [0, 1] at
    any resolution covering the whole image; `findings`: every finding's value and operating point;
    `regions`: the present findings' regions in `image` pixel coordinates. Only findings present at
    their operating point are drawn on the image. `caption` (e.g. the algorithm name and version) is
    written at the foot of the legend.
    """
    return _render(
        image, heatmaps, findings, regions, calibrated=calibrated, caption=caption, max_side=max_side
    ).rgb


def build_heatmap_sc(
    source: pydicom.Dataset,
    image: npt.NDArray[np.floating],
    heatmaps: Mapping[str, npt.NDArray[np.floating]],
    findings: Sequence[FindingResult],
    regions: Sequence[Region],
    ctx: OutputContext,
    *,
    max_side: int = 2048,
) -> pydicom.Dataset:
    """Build the heatmap Secondary Capture for `source`, in the same study, referencing it as source."""
    # Every attribute taken from the source comes from its checked header (worker.dicom.source).
    header = source_header(source)
    require_analysed(header)
    pixels = np.asarray(image)
    rows, columns = int(header.get("Rows") or 0), int(header.get("Columns") or 0)
    if pixels.shape != (rows, columns):
        raise ValueError(f"image shape {pixels.shape} does not match the source's {rows} x {columns}")
    algorithm = ctx.algorithm
    rendered = _render(
        pixels,
        heatmaps,
        findings,
        regions,
        calibrated=algorithm.calibrated,
        caption=f"{algorithm.name} {algorithm.version}",
        max_side=max_side,
    )
    sc = _sc_image(header, rendered, ctx)
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.BurnedInAnnotation = "YES"
    sc.DerivationDescription = (
        f"Heatmaps and regions of the findings above their operating points by {algorithm.name} "
        f"{algorithm.version} "
        f"(bundle {algorithm.bundle_hash}) over the source image; AI-generated, not for diagnostic use"
    )[:1024]
    sc.SourceImageSequence = [_source_reference(header)]
    _series_anatomy(header, sc)
    _carry_lossy_history(header, sc)
    return sc


def _sc_image(header: pydicom.Dataset, rendered: _Rendered, ctx: OutputContext) -> hd.sc.SCImage:
    """The SC over the rendered picture: the source's patient and study, its orientation where known,
    its pixel spacing scaled to the picture."""
    rows, columns = int(header.Rows), int(header.Columns)
    orientation = _patient_orientation(header)
    anatomical = str(header.get("AnatomicalOrientationType") or "") or None
    spacing = _scaled_spacing(header, rows / rendered.image_rows, columns / rendered.image_columns)
    prefix = f"{ctx.algorithm.name} "
    room = 64 - len(HEATMAP_SERIES_SUFFIX)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING, category=UserWarning)
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=header,
            pixel_array=rendered.rgb,
            photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
            bits_allocated=8,
            coordinate_system=hd.CoordinateSystemNames.PATIENT,
            # highdicom insists on an orientation for PATIENT images; an unknown one is blanked below.
            patient_orientation=orientation or ("L", "F"),
            # Only with a real orientation: the placeholder is a biped one.
            anatomical_orientation_type=anatomical if orientation is not None else None,
            pixel_spacing=spacing,  # type: ignore[arg-type]  # highdicom mis-annotates it as ints
            transfer_syntax_uid=pydicom.uid.ExplicitVRLittleEndian,
            series_description=(prefix if len(prefix) <= room else "") + HEATMAP_SERIES_SUFFIX,
            **ctx.identity(),
        )
    if orientation is None:
        sc.PatientOrientation = []  # Type 2: empty when unknown rather than invented
        if anatomical is not None:
            sc.AnatomicalOrientationType = anatomical
    return sc


def _source_reference(header: pydicom.Dataset) -> pydicom.Dataset:
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID = header.SOPClassUID
    reference.ReferencedSOPInstanceUID = header.SOPInstanceUID
    reference.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return reference


def _series_anatomy(header: pydicom.Dataset, sc: pydicom.Dataset) -> None:
    """Only General Series attributes: View Position and Image Laterality are not in the SC IOD, so
    Image Laterality survives as series Laterality. That is Type 2C (required for a paired body part):
    R or L where the source says so, absent for a stated body part (a chest is unpaired; an empty value
    there fails validation), empty where nothing is known, as in the GSPS."""
    body_part = str(header.get("BodyPartExamined") or "")
    if body_part:
        sc.BodyPartExamined = body_part
    laterality = str(header.get("Laterality") or header.get("ImageLaterality") or "")
    if laterality in ("R", "L"):
        sc.Laterality = laterality
    elif not body_part and ("Laterality" in header or "ImageLaterality" in header):
        sc.Laterality = ""


@dataclass(frozen=True)
class _Layout:
    """The picture's size: the image part (scaled) and the legend panel to its right."""

    width: int
    height: int
    panel_width: int

    @staticmethod
    def fit(rows: int, columns: int, max_side: int) -> _Layout:
        # Fit (image + panel) into max_side; enlarge small sources up to _MIN_LONG_SIDE for legibility.
        natural_long = max(rows, columns + _PANEL_RATIO * rows)
        target_long = min(max_side, max(natural_long, _MIN_LONG_SIDE))
        scale = target_long / natural_long
        height = max(1, min(max_side, round(rows * scale)))
        width = max(1, round(columns * scale))
        panel_width = max(1, min(max_side - width, round(_PANEL_RATIO * height)))
        return _Layout(width, height, panel_width)


def _render(
    image: npt.NDArray[np.floating],
    heatmaps: Mapping[str, npt.NDArray[np.floating]],
    findings: Sequence[FindingResult],
    regions: Sequence[Region],
    *,
    calibrated: bool,
    caption: str,
    max_side: int,
) -> _Rendered:
    grey = np.asarray(image, dtype=np.float32)
    if grey.ndim != 2 or min(grey.shape) < 2:
        raise ValueError(f"image must be 2-D, got shape {grey.shape}")
    if max_side < 64:
        raise ValueError("max_side must be at least 64")
    grey = np.clip(np.nan_to_num(grey, nan=0.0), 0.0, 1.0)
    rows, columns = grey.shape
    size = _Layout.fit(rows, columns, max_side)
    width, height = size.width, size.height

    numbers = _numbering(findings, regions)
    factors = (width / columns, height / rows)
    outlines = {r.label: scale_polygon(r.polygon, *factors) for r in regions}
    picture = _tinted(_resize(grey, width, height), heatmaps, regions, outlines, numbers)

    canvas = Image.new("RGB", (width + size.panel_width, height), (0, 0, 0))
    canvas.paste(Image.fromarray(np.round(picture * 255.0).astype(np.uint8)), (0, 0))
    draw = ImageDraw.Draw(canvas)
    _draw_regions(draw, size, regions, outlines, numbers, factors)
    _draw_legend(
        draw,
        left=width,
        width=size.panel_width,
        height=height,
        findings=findings,
        numbers=numbers,
        calibrated=calibrated,
        caption=caption,
    )
    return _Rendered(rgb=np.asarray(canvas, dtype=np.uint8), image_rows=height, image_columns=width)


def _tinted(
    grey: npt.NDArray[np.float32],
    heatmaps: Mapping[str, npt.NDArray[np.floating]],
    regions: Sequence[Region],
    outlines: Mapping[str, Sequence[tuple[float, float]]],
    numbers: Mapping[str, int],
) -> npt.NDArray[np.float32]:
    """The grey picture as RGB with each region's heat in its colour, inside its outline only (so the
    picture shows the reported regions and nothing else); the lowest-scoring finding is painted first,
    so the highest ends up on top."""
    height, width = grey.shape
    picture = np.repeat(grey[:, :, None], 3, axis=2)
    for region in sorted(regions, key=lambda r: numbers[r.label], reverse=True):
        if region.label not in heatmaps:
            continue
        heat = _resize(_as_heatmap(region.label, heatmaps[region.label]), width, height)
        heat = np.clip(np.nan_to_num(heat), 0.0, 1.0) * _inside(outlines[region.label], width, height)
        colour = np.asarray(_hue(numbers[region.label]), dtype=np.float32) / 255.0
        alpha = _MAX_ALPHA * np.clip((heat - _MIN_HEAT) / (1.0 - _MIN_HEAT), 0.0, 1.0)
        picture = picture * (1.0 - alpha[:, :, None]) + colour[None, None, :] * alpha[:, :, None]
    return picture


def _draw_regions(
    draw: ImageDraw.ImageDraw,
    size: _Layout,
    regions: Sequence[Region],
    outlines: Mapping[str, Sequence[tuple[float, float]]],
    numbers: Mapping[str, int],
    factors: tuple[float, float],
) -> None:
    """Each region's outline (a black rim under its colour, visible on bone) and its number at its peak."""
    width, height = size.width, size.height
    unit = max(height, 400)
    line = max(2, round(unit / 400))
    marker_size = max(14, round(unit / 28))
    marker_font = _font(marker_size)
    for region in regions:
        draw.line(outlines[region.label], fill=(0, 0, 0), width=line + 2, joint="curve")  # rim on bone
        draw.line(outlines[region.label], fill=_hue(numbers[region.label]), width=line, joint="curve")
    placed: list[tuple[float, float]] = []
    for region in sorted(regions, key=lambda r: numbers[r.label]):
        x, y = _free_spot(region.peak[0] * factors[0], region.peak[1] * factors[1], placed, marker_size)
        x = min(max(x, marker_size / 2), width - marker_size / 2)
        y = min(max(y, marker_size / 2), height - marker_size / 2)
        placed.append((x, y))
        draw.text(
            (x, y),
            str(numbers[region.label]),
            font=marker_font,
            fill=_hue(numbers[region.label]),
            anchor="mm",
            stroke_width=max(2, line),
            stroke_fill=(0, 0, 0),
        )


def _numbering(findings: Sequence[FindingResult], regions: Sequence[Region]) -> dict[str, int]:
    """Legend and marker numbers: 1, 2, … for the regions in their order (as the GSPS and the dashboard
    number them), then the present findings without a region, by falling score."""
    present = {f.label for f in findings if f.present and math.isfinite(f.score)}
    stray = [region.label for region in regions if region.label not in present]
    if stray:
        raise ValueError(f"regions for findings that are not present: {stray}")
    numbers = {region.label: n for n, region in enumerate(regions, start=1)}
    rest = sorted((f for f in findings if f.label in present - numbers.keys()), key=lambda f: -f.score)
    for finding in rest:
        numbers[finding.label] = len(numbers) + 1
    return numbers


def _inside(polygon: Sequence[tuple[float, float]], width: int, height: int) -> npt.NDArray[np.float32]:
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).polygon(list(polygon), fill=1)
    return np.asarray(mask, dtype=np.float32)


def _free_spot(x: float, y: float, placed: Sequence[tuple[float, float]], size: int) -> tuple[float, float]:
    """(x, y), or the nearest spot below it that no placed marker covers: peaks of a coarse heatmap
    often coincide, and two numbers drawn on one spot read as neither."""
    while any(abs(x - px) < size and abs(y - py) < size for px, py in placed):
        y += size
    return x, y


def _hue(number: int) -> RGB:
    return region_colour(number)


def _as_heatmap(label: str, heat: npt.NDArray[np.floating]) -> npt.NDArray[np.float32]:
    array = np.asarray(heat, dtype=np.float32)
    if array.ndim > 2:  # CAMs often come as (1, h, w); a real extra axis still fails below
        array = array.reshape([n for n in array.shape if n != 1] or [1, 1])
    if array.ndim != 2 or min(array.shape) < 1:
        raise ValueError(f"heatmap for {label} must be 2-D, got shape {array.shape}")
    return array


def _resize(array: npt.NDArray[np.float32], width: int, height: int) -> npt.NDArray[np.float32]:
    if array.shape == (height, width):
        return array
    image = Image.fromarray(np.ascontiguousarray(array, dtype=np.float32))
    shrinking = width < array.shape[1] and height < array.shape[0]
    method = Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR
    return np.asarray(image.resize((width, height), method), dtype=np.float32)


_Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


class _Pen:
    """Writes lines down the legend panel, wrapped to its width, from its top margin."""

    def __init__(self, draw: ImageDraw.ImageDraw, x: int, y: int, width: int) -> None:
        self.draw, self.x, self.y, self.width = draw, x, y, width

    def write(self, text: str, font: _Font, fill: RGB) -> None:
        for part in _wrap(self.draw, text, font, self.width):
            self.draw.text((self.x, self.y), part, font=font, fill=fill)
            self.y += _line_height(font)


def _draw_legend(
    draw: ImageDraw.ImageDraw,
    *,
    left: int,
    width: int,
    height: int,
    findings: Sequence[FindingResult],
    numbers: Mapping[str, int],
    calibrated: bool,
    caption: str,
) -> None:
    margin = max(6, round(width * 0.05))
    inner = width - 2 * margin
    big = _fitting_font(draw, _DISCLAIMER_LINES, inner, max(10, round(height / 30)))
    medium = _font(max(9, round(height / 40)))
    small = _font(max(8, round(height / 54)))
    pen = _Pen(draw, left + margin, margin, inner)
    for text in _DISCLAIMER_LINES:
        pen.write(text, big, (255, 215, 0))
    pen.y += _line_height(small)

    count = len(numbers)
    if count == 0:
        pen.write("No finding above its operating point", medium, (255, 255, 255))
    else:
        pen.write(f"{count} finding{'s' if count > 1 else ''} above operating point", medium, (255, 255, 255))
    pen.y += _line_height(small) // 2
    _legend_table(pen, findings, numbers, calibrated, _fitting_rows_font(draw, findings, inner, small))
    if count:
        pen.y += _line_height(small) // 2
        bar_height = max(6, _line_height(small) // 2)
        _gradient_bar(draw, pen.x, pen.y, inner, bar_height, (255, 255, 255))
        pen.y += bar_height + 2
        pen.write(f"heat {_MIN_HEAT:.1f} (clear) to 1.0; outline at 50% of each finding's peak", small, _GREY)

    footer = [caption] if caption else []
    if not calibrated:
        footer.append("Scores are not calibrated probabilities")
    lines = [part for text in footer for part in _wrap(draw, text, small, inner)]
    pen.y = max(pen.y, height - margin - len(lines) * _line_height(small))
    for part in lines:
        pen.write(part, small, _GREY)


def _legend_table(
    pen: _Pen, findings: Sequence[FindingResult], numbers: Mapping[str, int], calibrated: bool, font: _Font
) -> None:
    """Every finding: number (present ones), name, value and operating point; present rows in their colour."""
    draw, x = pen.draw, pen.x
    columns = (x + pen.width, x + round(pen.width * 0.78))  # right edges of "op. pt" and the value
    white = (255, 255, 255)
    draw.text((x, pen.y), "Finding", font=font, fill=white)
    draw.text((columns[1], pen.y), "prob." if calibrated else "score", font=font, fill=white, anchor="ra")
    draw.text((columns[0], pen.y), "op. pt", font=font, fill=white, anchor="ra")
    pen.y += _line_height(font)
    for finding in findings:
        number = numbers.get(finding.label)
        fill = _hue(number) if number else _GREY
        name = display_name(finding.label)
        draw.text((x, pen.y), f"{number if number else ' '}  {name}", font=font, fill=fill)
        draw.text((columns[1], pen.y), _value(finding.score, calibrated), font=font, fill=fill, anchor="ra")
        draw.text(
            (columns[0], pen.y), _value(finding.threshold, calibrated), font=font, fill=fill, anchor="ra"
        )
        pen.y += _line_height(font)


def _fitting_rows_font(
    draw: ImageDraw.ImageDraw,
    findings: Sequence[FindingResult],
    width: int,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """`font`, or a smaller one in which the longest row fits `width` without overlapping its numbers."""
    longest = max((f"00  {display_name(f.label)}  0.00  0.00" for f in findings), key=len, default="")
    size = int(getattr(font, "size", 10))
    while size > 8 and draw.textlength(longest, font=_font(size)) > width:
        size -= 1
    return _font(size)


def _value(value: float, calibrated: bool) -> str:
    if not math.isfinite(value):
        return "n/a"
    return _percent(value) if calibrated else f"{value:.2f}"


def _gradient_bar(draw: ImageDraw.ImageDraw, x: int, y: int, width: int, height: int, hue: RGB) -> None:
    # Same blend as the overlay, on mid grey: what the heat looks like on the image.
    base = np.full(3, 0.5, dtype=np.float32)
    colour = np.asarray(hue, dtype=np.float32) / 255.0
    for offset in range(max(1, width)):
        alpha = _MAX_ALPHA * offset / max(1, width - 1)
        mixed = base * (1.0 - alpha) + colour * alpha
        fill = (round(float(mixed[0]) * 255), round(float(mixed[1]) * 255), round(float(mixed[2]) * 255))
        draw.line([(x + offset, y), (x + offset, y + height - 1)], fill=fill)


def _wrap(
    draw: ImageDraw.ImageDraw, text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: int
) -> list[str]:
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}".strip()
        if current and draw.textlength(candidate, font=font) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    if current:
        lines.append(current)
    return lines


def _fitting_font(
    draw: ImageDraw.ImageDraw, lines: Sequence[str], width: int, largest: int
) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """The largest font up to `largest` px in which every line fits `width` (so none wraps)."""
    size = largest
    while size > 8:
        font = _font(size)
        if all(draw.textlength(text, font=font) <= width for text in lines):
            return font
        size -= 1
    return _font(size)


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    top, bottom = font.getbbox("Ag")[1::2]
    return math.ceil((bottom - top) * 1.35) + 1


def _percent(probability: float) -> str:
    percent = 100.0 * probability
    if 0.0 < percent < 1.0:
        return "<1%"
    return f"{percent:.0f}%"


def _patient_orientation(source: pydicom.Dataset) -> tuple[str, str] | None:
    values = [str(value) for value in (source.get("PatientOrientation") or [])]
    if len(values) != 2 or not all(values):
        return None
    anatomical = str(source.get("AnatomicalOrientationType") or "BIPED")
    allowed = (
        hd.PatientOrientationValuesQuadruped
        if anatomical == "QUADRUPED"
        else hd.PatientOrientationValuesBiped
    )
    try:
        for value in values:
            allowed(value)
    except ValueError:
        return None  # combined directions ("LP") and the like: leave the attribute empty
    return values[0], values[1]


def _scaled_spacing(
    source: pydicom.Dataset, row_factor: float, column_factor: float
) -> tuple[float, float] | None:
    spacing = [float(value) for value in (source.get("PixelSpacing") or [])]
    if len(spacing) != 2 or min(spacing) <= 0:  # zero spacing is a real-world quirk: omit
        return None
    return round(spacing[0] * row_factor, 6), round(spacing[1] * column_factor, 6)


def _carry_lossy_history(source: pydicom.Dataset, sc: pydicom.Dataset) -> None:
    """A derived image inherits "lossy compressed" from any lossy ancestor (PS3.3 C.7.6.1.1.5)."""
    file_meta = getattr(source, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if source.get("LossyImageCompression") == "01":
        sc.LossyImageCompression = "01"
        for keyword in ("LossyImageCompressionMethod", "LossyImageCompressionRatio"):
            if source.get(keyword):
                setattr(sc, keyword, source.get(keyword))
    elif syntax in _LOSSY_METHODS:
        sc.LossyImageCompression = "01"
        sc.LossyImageCompressionMethod = _LOSSY_METHODS[syntax]
