"""Findings GSPS: structure, references, polarity/VOI, no PHI in annotations, dciodvfy, DCMTK rendering."""

from __future__ import annotations

import subprocess
from copy import deepcopy
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image

from service.core.status import OutputKind
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.outputs import ALGORITHM, context, save
from tests.support.paths import CHEST_DICOM
from tests.support.peers import tool
from worker.dicom.codes import AI_DISCLAIMER, value_name
from worker.dicom.gsps import (
    CONTENT_LABEL,
    DISCLAIMER_LAYER,
    LABEL_LAYER,
    NO_FINDING_TEXT,
    OUTLINE_LAYER,
    build_findings_gsps,
)
from worker.dicom.sr import AlgorithmInfo, FindingResult
from worker.regions import Region, RegionKind, finding_region

CR = "cr-pa-mono1-explicit-le.dcm"
J2K = "cr-pa-mono1-j2k-lossless.dcm"
JPEG = "sc-pa-jpeg-baseline.dcm"
GSPS_CLASS = "1.2.840.10008.5.1.4.1.1.11.1"
FINDINGS = [
    FindingResult("Effusion", 0.91, 0.35),
    FindingResult("Pneumothorax", 0.62, 0.5),
    FindingResult("Mass", 0.12, 0.5),
]


def _blob(size: int, centre: tuple[float, float], sigma: float) -> npt.NDArray[np.float32]:
    rows, columns = np.mgrid[0:size, 0:size] / (size - 1)
    distance = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2
    return np.exp(-distance / (2 * sigma**2)).astype(np.float32)


def _regions(source: pydicom.Dataset) -> list[Region]:
    rows, columns = int(source.Rows), int(source.Columns)
    # A lower-zone effusion in the patient's left (image right) and an apical pneumothorax touching the top.
    effusion = finding_region("Effusion", _blob(16, (0.72, 0.72), 0.12), rows, columns)
    pneumothorax = finding_region("Pneumothorax", _blob(7, (0.0, 0.3), 0.08), rows, columns)
    assert effusion is not None and pneumothorax is not None
    return [effusion, pneumothorax]


def _build(
    source: pydicom.Dataset,
    regions: list[Region] | None = None,
    findings: list[FindingResult] | None = None,
    algorithm: AlgorithmInfo = ALGORITHM,
    **kwargs: bool,
) -> pydicom.Dataset:
    return build_findings_gsps(
        source,
        _regions(source) if regions is None else regions,
        FINDINGS if findings is None else findings,
        context(source, OutputKind.GSPS, algorithm),
        **kwargs,
    )


def _read(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(CHEST_DICOM / name)


def _layer(gsps: pydicom.Dataset, layer: str) -> list[pydicom.Dataset]:
    return [item for item in gsps.GraphicAnnotationSequence if item.GraphicLayer == layer]


def _texts(gsps: pydicom.Dataset, layer: str) -> list[str]:
    return [text.UnformattedTextValue for item in _layer(gsps, layer) for text in item.TextObjectSequence]


def _all_texts(gsps: pydicom.Dataset) -> list[str]:
    return [
        text.UnformattedTextValue
        for item in gsps.GraphicAnnotationSequence
        for text in item.get("TextObjectSequence", [])
    ]


@pytest.mark.parametrize("name", [CR, J2K, JPEG])
def test_gsps_outlines_the_regions(shared_dir: Path, name: str, tmp_path: Path) -> None:
    source = _read(name)
    rows, columns = int(source.Rows), int(source.Columns)
    regions = _regions(source)
    gsps = _build(source, regions)

    assert gsps.SOPClassUID == GSPS_CLASS and gsps.Modality == "PR"
    assert gsps.StudyInstanceUID == source.StudyInstanceUID
    assert (gsps.PatientID, gsps.PatientName) == (source.PatientID, source.PatientName)
    assert gsps.SeriesInstanceUID != source.SeriesInstanceUID and gsps.SeriesNumber == 9903
    assert gsps.SeriesDescription.endswith(AI_DISCLAIMER) and len(gsps.SeriesDescription) <= 64
    assert gsps.ContentLabel == CONTENT_LABEL
    assert AI_DISCLAIMER in gsps.ContentDescription and len(gsps.ContentDescription) <= 64
    assert not gsps.ContentCreatorName
    assert (gsps.Manufacturer, gsps.ManufacturerModelName) == (ALGORITHM.manufacturer, ALGORITHM.model_name)
    assert gsps.SoftwareVersions == ALGORITHM.software_version
    ours = [item for item in gsps.ContributingEquipmentSequence if item.Manufacturer == "cxr-gateway"]
    assert len(ours) == 1 and ours[0].DeviceUID == ALGORITHM.device_uid
    (series,) = gsps.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == source.SeriesInstanceUID
    (image,) = series.ReferencedImageSequence
    assert (image.ReferencedSOPClassUID, image.ReferencedSOPInstanceUID) == (
        source.SOPClassUID,
        source.SOPInstanceUID,
    )
    assert {layer.GraphicLayer for layer in gsps.GraphicLayerSequence} == {
        OUTLINE_LAYER,
        LABEL_LAYER,
        DISCLAIMER_LAYER,
    }
    for item in gsps.GraphicAnnotationSequence:
        (ref,) = item.ReferencedImageSequence
        assert ref.ReferencedSOPInstanceUID == source.SOPInstanceUID

    (outlines,) = _layer(gsps, OUTLINE_LAYER)
    objects = list(outlines.GraphicObjectSequence)
    assert len(objects) == len(regions)
    for graphic, region in zip(objects, regions, strict=True):
        assert (graphic.GraphicType, graphic.GraphicAnnotationUnits, graphic.GraphicDimensions) == (
            "POLYLINE",
            "PIXEL",
            2,
        )
        points = np.asarray(graphic.GraphicData, dtype=np.float64).reshape(-1, 2)
        assert graphic.NumberOfGraphicPoints == len(points) == len(region.polygon) >= 4
        assert np.array_equal(points[0], points[-1]), "the outline must be closed"
        assert points[:, 0].min() >= 0 and points[:, 0].max() <= columns
        assert points[:, 1].min() >= 0 and points[:, 1].max() <= rows
        assert np.allclose(points, np.asarray(region.polygon), atol=1e-3)

    (labels,) = _layer(gsps, LABEL_LAYER)
    boxes = []
    for number, (text, region) in enumerate(zip(labels.TextObjectSequence, regions, strict=True), start=1):
        assert text.UnformattedTextValue.startswith(f"{number} {value_name(region.label, False)} ")
        assert text.BoundingBoxAnnotationUnits == text.AnchorPointAnnotationUnits == "PIXEL"
        left, top = (float(v) for v in text.BoundingBoxTopLeftHandCorner)
        right, bottom = (float(v) for v in text.BoundingBoxBottomRightHandCorner)
        assert 0 <= left < right <= columns and 0 <= top < bottom <= rows
        assert [float(v) for v in text.AnchorPoint] == pytest.approx(region.peak, abs=1e-3)
        boxes.append((left, top, right, bottom))
    assert labels.TextObjectSequence[0].UnformattedTextValue == "1 Pleural effusion score 0.91"
    (a, b) = boxes
    assert a[2] <= b[0] or b[2] <= a[0] or a[3] <= b[1] or b[3] <= a[1], "labels must not overlap"

    corner = _texts(gsps, DISCLAIMER_LAYER)
    assert corner[:2] == [AI_DISCLAIMER, f"{ALGORITHM.name} {ALGORITHM.version}"]
    assert NO_FINDING_TEXT not in corner

    monochrome1 = source.PhotometricInterpretation == "MONOCHROME1"
    assert gsps.PresentationLUTShape == ("INVERSE" if monochrome1 else "IDENTITY")
    if "WindowCenter" in source:
        (voi,) = gsps.SoftcopyVOILUTSequence
        assert (float(voi.WindowCenter), float(voi.WindowWidth)) == (
            float(source.WindowCenter),
            float(source.WindowWidth),
        )
    else:
        assert "SoftcopyVOILUTSequence" not in gsps

    path = save(gsps, tmp_path / "gsps.dcm")
    assert dciodvfy_errors(path) == []
    assert pydicom.dcmread(path).SOPInstanceUID == gsps.SOPInstanceUID


def test_no_regions_and_nothing_present(shared_dir: Path, tmp_path: Path) -> None:
    source = _read(CR)
    quiet = [FindingResult("Effusion", 0.1, 0.35), FindingResult("Mass", 0.2, 0.5)]
    gsps = _build(source, [], quiet)

    assert not _layer(gsps, OUTLINE_LAYER) and not _layer(gsps, LABEL_LAYER)
    assert "GraphicGroupSequence" not in gsps
    assert _texts(gsps, DISCLAIMER_LAYER) == [
        AI_DISCLAIMER,
        f"{ALGORITHM.name} {ALGORITHM.version}",
        NO_FINDING_TEXT,
    ]
    (corner,) = _layer(gsps, DISCLAIMER_LAYER)
    for text in corner.TextObjectSequence:
        assert text.BoundingBoxAnnotationUnits == "DISPLAY"
        values = [
            float(v) for v in (*text.BoundingBoxTopLeftHandCorner, *text.BoundingBoxBottomRightHandCorner)
        ]
        assert all(0.0 <= v <= 1.0 for v in values)
    assert dciodvfy_errors(save(gsps, tmp_path / "empty.dcm")) == []


def test_present_findings_without_a_region_are_listed(shared_dir: Path) -> None:
    source = _read(JPEG)
    regions = [_regions(source)[0]]  # Effusion only: Pneumothorax is present but has no outline
    corner = _texts(_build(source, regions), DISCLAIMER_LAYER)
    assert "Not outlined: Pneumothorax score 0.62" in corner
    assert not any("Mass" in line or "effusion" in line for line in corner[2:])


def test_calibrated_values_read_as_probabilities(shared_dir: Path) -> None:
    source = _read(JPEG)
    calibrated = replace(ALGORITHM, calibrated=True)
    labels = _texts(_build(source, algorithm=calibrated), LABEL_LAYER)
    assert labels == ["1 Pleural effusion probability 91%", "2 Pneumothorax probability 62%"]


def test_region_below_its_operating_point_says_so(shared_dir: Path) -> None:
    source = _read(JPEG)
    region = finding_region("Mass", _blob(16, (0.4, 0.3), 0.1), int(source.Rows), int(source.Columns))
    assert region is not None
    (label,) = _texts(_build(source, [region]), LABEL_LAYER)
    assert label == "1 Mass score 0.12 (below operating point)"


def test_source_without_pixel_spacing_or_body_part(shared_dir: Path, tmp_path: Path) -> None:
    source = _read(JPEG)
    for keyword in ("PixelSpacing", "ImagerPixelSpacing", "BodyPartExamined"):
        if keyword in source:
            delattr(source, keyword)
    gsps = _build(source)
    assert "BodyPartExamined" not in gsps and gsps.Laterality == ""  # Type 2C: unknown, so empty
    assert dciodvfy_errors(save(gsps, tmp_path / "bare.dcm")) == []

    chest = _build(_read(CR))
    assert chest.BodyPartExamined == "CHEST" and "Laterality" not in chest  # unpaired: absent


def test_no_patient_data_in_annotations(shared_dir: Path) -> None:
    source = _read(CR)
    renamed = deepcopy(source)
    renamed.PatientName = "Other^Person"
    renamed.PatientID = "X123"
    renamed.StudyDate = "20240101"
    renamed.AccessionNumber = "ACC999"
    original, other = _build(source), _build(renamed)
    assert _all_texts(original) == _all_texts(other)
    identifiers = [str(source.PatientName), str(source.PatientID), str(source.AccessionNumber)]
    for text in _all_texts(original):
        assert not any(identifier and identifier in text for identifier in identifiers)
    assert [g.GraphicGroupLabel for g in original.GraphicGroupSequence] == [
        "1 Pleural effusion",
        "2 Pneumothorax",
    ]


def test_polarity_follows_the_pipeline(shared_dir: Path) -> None:
    mislabelled = _read("sc-pa-jpeg-baseline-mono1-label.dcm")  # says MONOCHROME1, pixels are not
    assert _build(mislabelled).PresentationLUTShape == "INVERSE"
    assert _build(mislabelled, pixels_inverted=True).PresentationLUTShape == "IDENTITY"
    assert _build(_read(JPEG), pixels_inverted=True).PresentationLUTShape == "INVERSE"


def test_window_and_voi_lut_are_carried_over(shared_dir: Path) -> None:
    source = _read(JPEG)
    source.WindowCenter = [127.5, 100]
    source.WindowWidth = [256, 120]
    source.WindowCenterWidthExplanation = ["FULL", "NARROW"]
    (voi,) = _build(source).SoftcopyVOILUTSequence
    assert [float(v) for v in voi.WindowCenter] == [127.5, 100.0]
    assert list(voi.WindowCenterWidthExplanation) == ["FULL", "NARROW"]

    source.WindowWidth = [0, 0]  # malformed: the presentation shows the full range instead
    assert "SoftcopyVOILUTSequence" not in _build(source)

    del source.WindowCenter, source.WindowWidth, source.WindowCenterWidthExplanation
    lut = pydicom.Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.LUTData = list(range(256))
    source.VOILUTSequence = [lut]
    (voi,) = _build(source).SoftcopyVOILUTSequence
    assert list(voi.VOILUTSequence[0].LUTDescriptor) == [256, 0, 8]


def test_dcmtk_renders_the_source_as_it_looks_alone(shared_dir: Path, tmp_path: Path) -> None:
    """Under the GSPS (INVERSE + the source's window) DCMTK renders the MONOCHROME1 CR as it does without."""
    dcmp2pgm = tool("dcmp2pgm", "dcmtk")
    image = CHEST_DICOM / CR
    pstate = save(_build(_read(CR)), tmp_path / "gsps.dcm")

    def render(*options: str) -> npt.NDArray[np.float64]:
        out = tmp_path / f"render{len(options)}.pgm"
        subprocess.run(
            [dcmp2pgm, *options, str(image), str(out)], check=True, capture_output=True, timeout=120
        )
        return np.asarray(Image.open(out), dtype=np.float64)

    alone, presented = render(), render("-p", str(pstate))
    assert alone.shape == presented.shape == (1955, 1841)
    assert np.abs(alone - presented).mean() < 1.0
    assert float(np.corrcoef(alone.ravel(), presented.ravel())[0, 1]) > 0.99


def test_inconsistent_input_is_refused(shared_dir: Path) -> None:
    source = _read(JPEG)
    regions = _regions(source)
    with pytest.raises(ValueError, match="no finding"):
        _build(source, regions, [FindingResult("Effusion", 0.9, 0.35)])
    with pytest.raises(ValueError, match="more than one region"):
        _build(source, [regions[0], regions[0]])
    with pytest.raises(ValueError, match="unknown finding"):
        _build(source, [], [FindingResult("Cat", 0.9, 0.5)])
    with pytest.raises(ValueError, match="more than once"):
        _build(source, [], [FindingResult("Mass", 0.9, 0.5), FindingResult("Mass", 0.2, 0.5)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        _build(source, [], [FindingResult("Mass", float("nan"), 0.5)])
    outside = replace(regions[0], polygon=((0.0, 0.0), (2000.0, 0.0), (0.0, 10.0), (0.0, 0.0)))
    with pytest.raises(ValueError, match="outside"):
        _build(source, [outside])
    open_polygon = Region(
        "Effusion", RegionKind.OUTLINE, ((1.0, 1.0), (5.0, 1.0), (5.0, 5.0), (1.0, 5.0)), (3, 3)
    )
    with pytest.raises(ValueError, match="closed"):
        _build(source, [open_polygon])

    for keyword in ("Rows", "SOPInstanceUID"):
        broken = deepcopy(source)
        delattr(broken, keyword)
        with pytest.raises(ValueError, match=f"lacks {keyword}"):
            _build(broken, [])
    colour = deepcopy(source)
    colour.SamplesPerPixel = 3
    colour.PhotometricInterpretation = "RGB"
    with pytest.raises(ValueError, match="grey"):
        _build(colour, [])
