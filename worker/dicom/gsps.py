"""Grayscale Softcopy Presentation State (GSPS) with the findings' outlines over the source image.

An optional output per destination, for PACS viewers that render presentation states (OHIF 3.13 does
not; see VIEWERS.md). It shows the same regions (`worker.regions`) as the SR and the SC::

    Graphic layer AI_OUTLINES    one closed POLYLINE (PIXEL units) per region
    Graphic layer AI_LABELS      one text per region: "1 Pneumothorax score 0.83", boxed next to the
                                 region (inside the image) with a visible anchor on the region's peak
    Graphic layer AI_DISCLAIMER  bottom-left corner (DISPLAY units): the disclaimer, the algorithm and
                                 version, and "No finding above its operating point" when none is, or
                                 the present findings that have no outline

Grey-scale rendering: under a presentation state the Presentation LUT Shape decides the polarity
and the image's Photometric Interpretation no longer does (DCMTK's dcmp2pgm renders a MONOCHROME1
image inverted under IDENTITY). So the shape is INVERSE for a MONOCHROME1 source, as DCMTK's dcmpsmk
writes it, and IDENTITY otherwise; the other way round where the pipeline found the pixels inverted
against their label (`pixels_inverted`). Like the pixel reader, this follows the Photometric
Interpretation, not a Presentation LUT Shape the source may carry. The source's VOI (its windows, the
first being the default, else its VOI LUT Sequence) and its modality rescale or LUT are carried over;
a source without a VOI gets none (the viewer shows the full range, as it would the source alone).

Only algorithm information and finding names/values are written into text objects, never anything
from the patient/study header.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass

import numpy as np
import pydicom
from highdicom import PresentationLUTTransformation
from highdicom.color import CIELabColor
from highdicom.enum import PresentationLUTShapeValues
from highdicom.pr import (
    AnnotationUnitsValues,
    GraphicAnnotation,
    GraphicGroup,
    GraphicLayer,
    GraphicObject,
    GraphicTypeValues,
    GrayscaleSoftcopyPresentationState,
    SoftcopyVOILUTTransformation,
    TextJustificationValues,
    TextObject,
)
from pydicom.multival import MultiValue

from worker.dicom.codes import AI_DISCLAIMER, FINDING_CODES, display_name, value_name
from worker.dicom.source import fill_empty_type2, require_analysed
from worker.dicom.sr import (
    AlgorithmInfo,
    FindingResult,
    OutputContext,
    series_description,
    source_header,
)
from worker.regions import Region

__all__ = [
    "CONTENT_LABEL",
    "DISCLAIMER_LAYER",
    "LABEL_LAYER",
    "NO_FINDING_TEXT",
    "OUTLINE_LAYER",
    "build_findings_gsps",
]

CONTENT_LABEL = "CXR_AI_FINDINGS"
OUTLINE_LAYER = "AI_OUTLINES"
LABEL_LAYER = "AI_LABELS"
DISCLAIMER_LAYER = "AI_DISCLAIMER"
NO_FINDING_TEXT = "No finding above its operating point"

_LO_MAX = 64
_ST_MAX = 1024  # Unformatted Text Value (ST)
# Layer colours (CIELab from sRGB) and, for grey-scale displays, white.
_OUTLINE_RGB = (255, 215, 0)
_DISCLAIMER_RGB = (255, 255, 0)
_GREY_WHITE = 0xFFFF
# Region labels: text height relative to the image's rows, average glyph width relative to height.
_LABEL_HEIGHT = 0.025
_MIN_LABEL_HEIGHT = 12.0
_GLYPH_WIDTH = 0.6
# Corner text in DISPLAY units (fractions of the displayed area): one line per text object.
_CORNER_LEFT = 0.01
_CORNER_RIGHT = 0.75
_CORNER_BOTTOM = 0.99
_CORNER_LINE = 0.035
_MAX_CORNER_LINES = 20
_VOI_KEYWORDS = (
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTFunction",
    "VOILUTSequence",
)
_PERSON_NAME_WARNING = ".*unlikely to represent the intended person name.*"

Point = tuple[float, float]
Box = tuple[float, float, float, float]  # left, top, right, bottom


def build_findings_gsps(
    source: pydicom.Dataset,
    regions: Sequence[Region],
    findings: Sequence[FindingResult],
    ctx: OutputContext,
    *,
    pixels_inverted: bool = False,
) -> pydicom.Dataset:
    """Build a GSPS for `source` outlining `regions`, each labelled with its finding's value.

    `regions` are in `source`'s pixel coordinates (`worker.regions`); every region's label must be one
    of `findings` (at most one region per label). `pixels_inverted`: the source's pixels are known to
    be inverted against its Photometric Interpretation (`DisplayImage.inverted_by_heuristic`), so the
    presentation flips them back (bone bright). Raises ValueError on inconsistent input.
    """
    # Every attribute taken from the source comes from its checked header (worker.dicom.source).
    header = source_header(source)
    require_analysed(header)
    rows, columns = _check_source(header)
    by_label = _check_findings(findings)
    _check_regions(regions, by_label, rows, columns)
    display = _take_display(header)
    layers = _layers()
    drawn = _Outlines.of(regions, by_label, ctx.algorithm, rows, columns)
    corner = _corner_texts(_corner_lines(regions, findings, ctx.algorithm)[:_MAX_CORNER_LINES])
    annotations = _annotations(header, layers, drawn, corner)

    inverse = display.monochrome1 != pixels_inverted
    shape = PresentationLUTShapeValues.INVERSE if inverse else PresentationLUTShapeValues.IDENTITY
    voi = display.voi
    with warnings.catch_warnings():
        # Names are copied verbatim from the source; highdicom's advice on their form is log noise here.
        warnings.filterwarnings("ignore", message=_PERSON_NAME_WARNING)
        gsps = GrayscaleSoftcopyPresentationState(
            referenced_images=[header],
            device_serial_number=None,  # type: ignore[arg-type]  # Type 3: highdicom leaves it out
            content_label=CONTENT_LABEL,
            content_description=series_description("AI findings"),
            graphic_annotations=annotations,
            graphic_layers=layers,
            graphic_groups=drawn.groups or None,
            content_creator_name=None,  # Type 2: empty; the algorithm is in Contributing Equipment
            voi_lut_transformations=[voi] if isinstance(voi, SoftcopyVOILUTTransformation) else None,
            presentation_lut_transformation=PresentationLUTTransformation(presentation_lut_shape=shape),
            series_description=series_description(f"{ctx.algorithm.name} outlines"),
            **ctx.identity(),
        )
    if voi is not None and not isinstance(voi, SoftcopyVOILUTTransformation):
        gsps.SoftcopyVOILUTSequence = [voi]
    if display.modality_lut is not None:
        gsps.ModalityLUTSequence = display.modality_lut
    _general_series_anatomy(display.anatomy, gsps)
    return gsps


@dataclass(frozen=True)
class _Display:
    """What the presentation carries over from the source, taken out of its header."""

    voi: SoftcopyVOILUTTransformation | pydicom.Dataset | None
    modality_lut: pydicom.Sequence | None
    monochrome1: bool
    anatomy: pydicom.Dataset


def _take_display(header: pydicom.Dataset) -> _Display:
    """The source's VOI, modality LUT, polarity and anatomy; then the header is made ready for
    highdicom (which reads the referenced image's pixel module and copies what it finds)."""
    fill_empty_type2(header)
    # highdicom reads the referenced image's pixel module. An absent (or invalid, so left out) value
    # means the default that _check_source and the pixel reader applied: one grey sample per pixel.
    if "SamplesPerPixel" not in header:
        header.SamplesPerPixel = 1
    if "PhotometricInterpretation" not in header:
        header.PhotometricInterpretation = "MONOCHROME2"
    anatomy = pydicom.Dataset()
    for keyword in ("BodyPartExamined", "Laterality", "ImageLaterality"):
        if keyword in header:
            anatomy.add(header[keyword])
    display = _Display(
        voi=_voi(header),
        modality_lut=_modality_lut(header),
        monochrome1=str(header.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1",
        anatomy=anatomy,
    )
    # What is not carried over explicitly must not be copied by highdicom from the header.
    for keyword in (*_VOI_KEYWORDS, "ModalityLUTSequence"):
        if keyword in header:
            delattr(header, keyword)
    return display


def _layers() -> list[GraphicLayer]:
    layers = [
        GraphicLayer(
            OUTLINE_LAYER, order=1, description="AI finding outlines", display_color=_lab(_OUTLINE_RGB)
        ),
        GraphicLayer(LABEL_LAYER, order=2, description="AI finding labels", display_color=_lab(_OUTLINE_RGB)),
        GraphicLayer(
            DISCLAIMER_LAYER, order=3, description=AI_DISCLAIMER, display_color=_lab(_DISCLAIMER_RGB)
        ),
    ]
    for layer in layers:
        layer.GraphicLayerRecommendedDisplayGrayscaleValue = _GREY_WHITE
    return layers


@dataclass(frozen=True)
class _Outlines:
    """Per region: a numbered graphic group, its closed outline and its boxed label."""

    groups: list[GraphicGroup]
    outlines: list[GraphicObject]
    labels: list[TextObject]

    @staticmethod
    def of(
        regions: Sequence[Region],
        by_label: Mapping[str, FindingResult],
        algorithm: AlgorithmInfo,
        rows: int,
        columns: int,
    ) -> _Outlines:
        drawn = _Outlines([], [], [])
        taken: list[Box] = []
        for number, region in enumerate(regions, start=1):
            group = GraphicGroup(number, _truncate(f"{number} {display_name(region.label)}", _LO_MAX))
            drawn.groups.append(group)
            drawn.outlines.append(
                GraphicObject(
                    graphic_type=GraphicTypeValues.POLYLINE,
                    graphic_data=np.asarray(region.polygon, dtype=np.float64),
                    units=AnnotationUnitsValues.PIXEL,
                    graphic_group=group,
                )
            )
            text = _region_text(number, by_label[region.label], algorithm)
            box = _label_box(region, text, rows, columns, taken)
            taken.append(box)
            drawn.labels.append(
                TextObject(
                    text_value=text,
                    units=AnnotationUnitsValues.PIXEL,
                    bounding_box=box,
                    anchor_point=region.peak,
                    text_justification=TextJustificationValues.LEFT,
                    anchor_point_visible=True,
                    graphic_group=group,
                )
            )
        return drawn


def _annotations(
    header: pydicom.Dataset, layers: Sequence[GraphicLayer], drawn: _Outlines, corner: list[TextObject]
) -> list[GraphicAnnotation]:
    """Outlines and labels on their layers (when there are regions), the corner text on its own."""
    annotations: list[GraphicAnnotation] = []
    if drawn.outlines:
        annotations.append(GraphicAnnotation([header], layers[0], graphic_objects=drawn.outlines))
        annotations.append(GraphicAnnotation([header], layers[1], text_objects=drawn.labels))
    annotations.append(GraphicAnnotation([header], layers[2], text_objects=corner))
    return annotations


def _corner_lines(
    regions: Sequence[Region], findings: Sequence[FindingResult], algorithm: AlgorithmInfo
) -> list[str]:
    """The disclaimer and the algorithm; then that nothing is present, or what is present unoutlined."""
    outlined = {region.label for region in regions}
    corner = [AI_DISCLAIMER, f"{algorithm.name} {algorithm.version}"]
    if not any(finding.present for finding in findings):
        corner.append(NO_FINDING_TEXT)
    else:
        corner.extend(
            f"Not outlined: {_value_text(finding, algorithm)}"
            for finding in findings
            if finding.present and finding.label not in outlined
        )
    return corner


def _general_series_anatomy(source: pydicom.Dataset, gsps: pydicom.Dataset) -> None:
    """Body Part Examined and Laterality (General Series) as the source states them, as in the SC.

    Laterality is Type 2C (required for a paired body part without Image Laterality): R or L where the
    source says so, absent for a stated body part (a chest is unpaired), empty where nothing is known.
    """
    body_part = str(source.get("BodyPartExamined") or "").strip()
    if body_part:
        gsps.BodyPartExamined = body_part
    laterality = str(source.get("Laterality") or source.get("ImageLaterality") or "").strip()
    if laterality in ("R", "L"):
        gsps.Laterality = laterality
    elif not body_part:
        gsps.Laterality = ""


def _check_source(source: pydicom.Dataset) -> tuple[int, int]:
    for keyword in (
        "StudyInstanceUID",
        "SeriesInstanceUID",
        "SOPClassUID",
        "SOPInstanceUID",
        "Rows",
        "Columns",
    ):
        if source.get(keyword) in (None, ""):
            raise ValueError(f"source lacks {keyword}")
    rows, columns = int(source.Rows), int(source.Columns)
    if rows < 1 or columns < 1:
        raise ValueError(f"source has no pixels: {rows} x {columns}")
    if int(source.get("SamplesPerPixel", 1) or 1) != 1:
        raise ValueError("a grayscale presentation state needs a single-sample (grey) source image")
    if str(source.get("PhotometricInterpretation", "MONOCHROME2")).strip() not in (
        "MONOCHROME1",
        "MONOCHROME2",
    ):
        raise ValueError(f"source is not grey: Photometric Interpretation {source.PhotometricInterpretation}")
    if int(source.get("NumberOfFrames", 1) or 1) != 1:
        raise ValueError("source must be a single-frame image")
    return rows, columns


def _check_findings(findings: Sequence[FindingResult]) -> dict[str, FindingResult]:
    by_label: dict[str, FindingResult] = {}
    for finding in findings:
        if finding.label not in FINDING_CODES:
            raise ValueError(f"unknown finding label: {finding.label!r}")
        if finding.label in by_label:
            raise ValueError(f"finding {finding.label!r} appears more than once")
        if not (0.0 <= finding.score <= 1.0 and 0.0 <= finding.threshold <= 1.0):
            raise ValueError(f"{finding.label}: score and threshold must lie in [0, 1]")
        by_label[finding.label] = finding
    return by_label


def _check_regions(
    regions: Sequence[Region], by_label: dict[str, FindingResult], rows: int, columns: int
) -> None:
    seen: set[str] = set()
    for region in regions:
        if region.label not in by_label:
            raise ValueError(f"region {region.label!r} has no finding among the results")
        if region.label in seen:
            raise ValueError(f"more than one region for {region.label!r}")
        seen.add(region.label)
        points = [*region.polygon, region.peak]
        if len(region.polygon) < 4 or region.polygon[0] != region.polygon[-1]:
            raise ValueError(f"region {region.label!r}: the outline must be a closed polygon of 3+ vertices")
        for x, y in points:
            if not (math.isfinite(x) and math.isfinite(y) and 0.0 <= x <= columns and 0.0 <= y <= rows):
                raise ValueError(
                    f"region {region.label!r}: point ({x}, {y}) lies outside the {columns} x {rows} image"
                )


def _voi(source: pydicom.Dataset) -> SoftcopyVOILUTTransformation | pydicom.Dataset | None:
    """The source's VOI as a Softcopy VOI LUT item: its windows, else its VOI LUT Sequence, else None.

    A malformed window (count mismatch, width < 1, not numeric) is not carried over: the presentation
    state then shows the full range rather than failing on the source's defect.
    """
    centers, widths = _values(source.get("WindowCenter")), _values(source.get("WindowWidth"))
    if centers and widths:
        try:
            center_values = [float(v) for v in centers]
            width_values = [float(v) for v in widths]
        except (TypeError, ValueError):
            center_values, width_values = [], []
        count = min(len(center_values), len(width_values))
        pairs = [
            (c, w)
            for c, w in zip(center_values[:count], width_values[:count], strict=True)
            if math.isfinite(c) and math.isfinite(w) and w >= 1.0
        ]
        if pairs:
            function = str(source.get("VOILUTFunction") or "").strip().upper()
            explanations = _values(source.get("WindowCenterWidthExplanation"))
            return SoftcopyVOILUTTransformation(
                window_center=[c for c, _ in pairs],
                window_width=[w for _, w in pairs],
                window_explanation=(
                    [_truncate(e, _LO_MAX) for e in explanations]
                    if len(explanations) == len(pairs) and len(pairs) == count
                    else None
                ),
                voi_lut_function=function if function in ("LINEAR", "LINEAR_EXACT", "SIGMOID") else None,
            )
    luts = source.get("VOILUTSequence")
    if luts and all("LUTDescriptor" in item and "LUTData" in item for item in luts):
        item = pydicom.Dataset()
        item.VOILUTSequence = deepcopy(luts)
        return item
    return None


def _modality_lut(source: pydicom.Dataset) -> pydicom.Sequence | None:
    """The source's Modality LUT Sequence, where it has one instead of a rescale (highdicom copies that)."""
    if "RescaleSlope" in source or "RescaleIntercept" in source:
        return None
    luts: pydicom.Sequence | None = source.get("ModalityLUTSequence")
    if luts and len(luts) == 1 and "LUTDescriptor" in luts[0] and "LUTData" in luts[0]:
        return deepcopy(luts)
    return None


def _values(value: object) -> list[str]:
    """A (possibly multi-valued) element value as strings; nothing for an absent or empty one."""
    if value is None or value == "":
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v) for v in value]
    return [str(value)]


def _value_text(finding: FindingResult, algorithm: AlgorithmInfo) -> str:
    """ "Pneumothorax score 0.83", or "Pneumothorax probability 83%" for a calibrated bundle (as the SR)."""
    value = f"{100.0 * finding.score:.0f}%" if algorithm.calibrated else f"{finding.score:.2f}"
    text = f"{value_name(finding.label, algorithm.calibrated)} {value}"
    return text if finding.present else f"{text} (below operating point)"


def _region_text(number: int, finding: FindingResult, algorithm: AlgorithmInfo) -> str:
    return _truncate(f"{number} {_value_text(finding, algorithm)}", _ST_MAX)


def _label_box(region: Region, text: str, rows: int, columns: int, taken: Sequence[Box]) -> Box:
    """A box for `text` just above the region (else below it, else at its top inside it), inside the
    image; moved a line further away from the region while it would cover a box already placed."""
    height = min(float(rows), max(_MIN_LABEL_HEIGHT, _LABEL_HEIGHT * rows))
    width = min(float(columns), max(height, len(text) * _GLYPH_WIDTH * height))
    xs = [x for x, _ in region.polygon]
    ys = [y for _, y in region.polygon]
    left = min(max(min(xs), 0.0), columns - width)
    gap = 0.25 * height
    lowest = rows - height

    def box(top: float) -> Box:
        return (round(left, 2), round(top, 2), round(left + width, 2), round(top + height, 2))

    # (first top, direction of the next try): above goes up, below and inside go down.
    placements = [(min(ys) - gap - height, -1.0), (max(ys) + gap, 1.0), (min(ys), 1.0)]
    fallback: Box | None = None
    for start, direction in placements:
        top = start
        while 0.0 <= top <= lowest:
            candidate = box(top)
            fallback = fallback or candidate
            if not any(_overlap(candidate, other) for other in taken):
                return candidate
            top += direction * height
    return fallback or box(min(max(min(ys), 0.0), lowest))


def _overlap(a: Box, b: Box) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _corner_texts(lines: Sequence[str]) -> list[TextObject]:
    """Left-justified lines stacked upwards from the bottom-left corner of the displayed area."""
    first_top = _CORNER_BOTTOM - len(lines) * _CORNER_LINE
    return [
        TextObject(
            text_value=_truncate(line, _ST_MAX),
            units=AnnotationUnitsValues.DISPLAY,
            bounding_box=(
                _CORNER_LEFT,
                round(first_top + i * _CORNER_LINE, 4),
                _CORNER_RIGHT,
                round(first_top + (i + 1) * _CORNER_LINE, 4),
            ),
            text_justification=TextJustificationValues.LEFT,
        )
        for i, line in enumerate(lines)
    ]


def _lab(rgb: tuple[int, int, int]) -> CIELabColor:
    return CIELabColor.from_rgb(*rgb)


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
