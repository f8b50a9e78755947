"""Heatmap Secondary Capture: overlay and outlines only for present findings, legend, size limits, DICOM
attributes, dciodvfy."""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest

from service.core.status import OutputKind
from tests.support.dciodvfy import dciodvfy_errors
from tests.support.outputs import ALGORITHM, context
from tests.support.paths import CHEST_DICOM
from worker.dicom.pixels import read_display_pixels
from worker.dicom.sc import HEATMAP_SERIES_SUFFIX, build_heatmap_sc, render_heatmap_rgb
from worker.dicom.sr import FindingResult
from worker.labels import NIH_LABELS
from worker.regions import Region, finding_region

# Patient's left lung: image right in a PA radiograph displayed the standard way (row direction = L).
LEFT_LUNG = (0.45, 0.70)
RIGHT_LUNG = (0.45, 0.30)


def _blob(size: int, centre: tuple[float, float], sigma: float = 0.12) -> npt.NDArray[np.float32]:
    rows, columns = np.mgrid[0:size, 0:size] / (size - 1)
    distance = (rows - centre[0]) ** 2 + (columns - centre[1]) ** 2
    return np.exp(-distance / (2 * sigma**2)).astype(np.float32)


def _image_width(rgb: npt.NDArray[np.uint8]) -> int:
    """Width of the X-ray part: the legend panel on the right is 0.36 x the height."""
    return rgb.shape[1] - round(0.36 * rgb.shape[0])


def _pixel(rgb: npt.NDArray[np.uint8], where: tuple[float, float]) -> npt.NDArray[np.int64]:
    row = round(where[0] * (rgb.shape[0] - 1))
    column = round(where[1] * (_image_width(rgb) - 1))
    return rgb[row - 2 : row + 3, column - 2 : column + 3].reshape(-1, 3).mean(axis=0).astype(np.int64)


def _is_red(colour: npt.NDArray[np.int64]) -> bool:
    return bool(colour[0] - max(colour[1], colour[2]) > 40)


def _is_grey(colour: npt.NDArray[np.int64]) -> bool:
    return bool(np.ptp(colour) <= 3)


def _findings(scores: dict[str, float], threshold: float = 0.5) -> list[FindingResult]:
    """All 14 findings: those in ``scores`` at their score, the others at 0.05."""
    return [FindingResult(label, scores.get(label, 0.05), threshold) for label in NIH_LABELS]


def _regions(
    findings: list[FindingResult], heatmaps: dict[str, npt.NDArray[np.float32]], shape: tuple[int, int]
) -> list[Region]:
    # Highest score first, as the pipeline orders them: region n is drawn and listed as number n.
    ranked = sorted((f for f in findings if f.present), key=lambda f: -f.score)
    found = [finding_region(f.label, heatmaps[f.label], *shape) for f in ranked]
    return [region for region in found if region is not None]


def _render(
    image: npt.NDArray[np.float32],
    heatmaps: dict[str, npt.NDArray[np.float32]],
    scores: dict[str, float],
    *,
    caption: str = "",
    max_side: int = 2048,
) -> npt.NDArray[np.uint8]:
    findings = _findings(scores)
    regions = _regions(findings, heatmaps, image.shape)
    return render_heatmap_rgb(image, heatmaps, findings, regions, caption=caption, max_side=max_side)


def _build(source: pydicom.Dataset, *, max_side: int = 2048) -> pydicom.Dataset:
    display = read_display_pixels(source)
    heatmaps = {"Effusion": _blob(16, LEFT_LUNG), "Atelectasis": _blob(16, RIGHT_LUNG)}
    findings = _findings({"Effusion": 0.87, "Atelectasis": 0.2})
    return build_heatmap_sc(
        source,
        display.pixels,
        heatmaps,
        findings,
        _regions(findings, heatmaps, display.pixels.shape),
        context(source, OutputKind.SC),
        max_side=max_side,
    )


@pytest.mark.parametrize("name", ["cr-pa-mono1-explicit-le.dcm", "sc-pa-jpeg-baseline.dcm"])
def test_heatmap_sc(shared_dir: Path, name: str, tmp_path: Path) -> None:
    source = pydicom.dcmread(CHEST_DICOM / name)
    sc = _build(source)

    assert sc.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage
    assert sc.PhotometricInterpretation == "RGB"
    assert (sc.SamplesPerPixel, sc.BitsAllocated) == (3, 8)
    assert list(sc.ImageType) == ["DERIVED", "SECONDARY"]
    assert sc.BurnedInAnnotation == "YES"
    assert HEATMAP_SERIES_SUFFIX in sc.SeriesDescription and len(sc.SeriesDescription) <= 64
    assert sc.StudyInstanceUID == source.StudyInstanceUID
    assert sc.PatientID == source.PatientID
    assert sc.SeriesInstanceUID != source.SeriesInstanceUID
    assert max(sc.Rows, sc.Columns) <= 2048
    (reference,) = sc.SourceImageSequence
    assert reference.ReferencedSOPInstanceUID == source.SOPInstanceUID
    assert reference.ReferencedSOPClassUID == source.SOPClassUID
    ours = [item for item in sc.ContributingEquipmentSequence if item.Manufacturer == "cxr-gateway"]
    assert len(ours) == 1 and ours[0].DeviceUID == ALGORITHM.device_uid
    assert ours[0].PurposeOfReferenceCodeSequence[0].CodeValue == "109102"

    path = tmp_path / "sc.dcm"
    sc.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []

    rgb = pydicom.dcmread(path).pixel_array
    assert _is_red(_pixel(rgb, LEFT_LUNG)), "overlay should sit on the patient's left lung"
    assert _is_grey(_pixel(rgb, RIGHT_LUNG)), "an absent finding (Atelectasis 0.2) must not be drawn"
    panel = rgb[:, _image_width(rgb) + 5 :]
    yellow = (panel[..., 0] > 200) & (panel[..., 1] > 170) & (panel[..., 2] < 80)
    assert yellow.sum() > 100, "the disclaimer (yellow text) should be in the legend panel"


def test_geometry_attributes_follow_the_source(shared_dir: Path) -> None:
    cr = pydicom.dcmread(CHEST_DICOM / "cr-pa-mono1-explicit-le.dcm")
    sc = _build(cr)
    assert list(sc.PatientOrientation) == ["L", "F"]
    assert "PixelSpacing" not in sc  # the source's spacing is 0\0: nothing to scale

    jpeg = pydicom.dcmread(CHEST_DICOM / "sc-pa-jpeg-baseline.dcm")
    sc = _build(jpeg, max_side=1024 + 369)
    assert sc.Rows == 1024
    assert [float(v) for v in sc.PixelSpacing] == pytest.approx([0.168, 0.168])
    assert not sc.PatientOrientation  # unknown in the source: left empty, not invented
    assert sc.LossyImageCompression == "01"  # the JPEG baseline ancestry is carried over

    small = _build(jpeg, max_side=700)
    assert max(small.Rows, small.Columns) <= 700
    assert float(small.PixelSpacing[0]) == pytest.approx(0.168 * 1024 / small.Rows, rel=1e-3)


def test_no_patient_data_reaches_the_pixels(shared_dir: Path) -> None:
    source = pydicom.dcmread(CHEST_DICOM / "sc-pa-jpeg-baseline.dcm")
    renamed = deepcopy(source)
    renamed.PatientName = "Other^Person"
    renamed.PatientID = "X123"
    renamed.StudyDate = "20240101"
    assert _build(source).PixelData == _build(renamed).PixelData


def test_shape_mismatch_is_refused(shared_dir: Path) -> None:
    source = pydicom.dcmread(CHEST_DICOM / "sc-pa-jpeg-baseline.dcm")
    with pytest.raises(ValueError, match="does not match"):
        build_heatmap_sc(
            source,
            np.zeros((10, 10), np.float32),
            {},
            _findings({}),
            [],
            context(source, OutputKind.SC),
        )


# ---------------------------------------------------------------------------------------------- rendering


def _chest_like(rows: int = 400, columns: int = 360) -> npt.NDArray[np.float32]:
    """Mid-grey with texture: enough to tell overlay colour from the image."""
    rng = np.random.default_rng(1)
    return (0.4 + 0.2 * rng.random((rows, columns))).astype(np.float32)


def test_only_present_findings_are_drawn() -> None:
    places = {
        "Effusion": (0.3, 0.25),
        "Atelectasis": (0.3, 0.75),
        "Mass": (0.75, 0.25),
        "Nodule": (0.75, 0.75),
    }
    # Mass scores high but below its operating point: the old rule (top three by score) drew it.
    scores = {"Effusion": 0.9, "Atelectasis": 0.6, "Mass": 0.45, "Nodule": 0.1}
    heatmaps = {label: _blob(16, where, sigma=0.08) for label, where in places.items()}
    rgb = _render(_chest_like(), heatmaps, scores, caption="test 1.0")
    assert _is_red(_pixel(rgb, places["Effusion"]))  # number 1 is red
    assert not _is_grey(_pixel(rgb, places["Atelectasis"]))
    assert _is_grey(_pixel(rgb, places["Mass"])), "a finding below its operating point must not be drawn"
    assert _is_grey(_pixel(rgb, places["Nodule"]))


def test_nothing_present_draws_nothing_on_the_image() -> None:
    image = _chest_like()
    heat = {label: _blob(16, (0.5, 0.5)) for label in NIH_LABELS}
    rgb = _render(image, heat, {"Effusion": 0.45})
    part = rgb[:, : _image_width(rgb)].astype(np.int64)
    assert np.ptp(part, axis=2).max() == 0, "no finding present: the X-ray stays grey"
    none = _render(image, heat, {})
    assert not np.array_equal(rgb, none), "the legend's table still shows each value"


def test_regions_for_absent_findings_are_refused() -> None:
    heat = {"Mass": _blob(16, (0.5, 0.5))}
    (region,) = _regions(_findings({"Mass": 0.9}), heat, (400, 360))
    with pytest.raises(ValueError, match="not present"):
        render_heatmap_rgb(_chest_like(), heat, _findings({"Mass": 0.1}), [region])


def test_overlay_stays_inside_the_outline() -> None:
    heat = {"Effusion": _blob(16, LEFT_LUNG, sigma=0.25)}  # warm far beyond its 50 % outline
    rgb = _render(_chest_like(), heat, {"Effusion": 0.9})
    assert _is_red(_pixel(rgb, LEFT_LUNG))
    assert _is_grey(_pixel(rgb, (0.95, 0.05))), "heat outside the reported region is not tinted"


@pytest.mark.parametrize(("shape", "max_side", "longest"), [((400, 360), 512, 512), ((169, 211), 2048, 1024)])
def test_output_size(shape: tuple[int, int], max_side: int, longest: int) -> None:
    rgb = _render(_chest_like(*shape), {"Mass": _blob(7, (0.5, 0.5))}, {"Mass": 0.6}, max_side=max_side)
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert max(rgb.shape[:2]) == longest
    # The X-ray keeps its aspect ratio.
    assert _image_width(rgb) / rgb.shape[0] == pytest.approx(shape[1] / shape[0], abs=0.02)


def test_singleton_axes_are_squeezed() -> None:
    heat = _blob(7, (0.5, 0.5))
    flat = _render(_chest_like(), {"Mass": heat}, {"Mass": 0.6})
    stacked = _render(_chest_like(), {"Mass": heat[None]}, {"Mass": 0.6})
    np.testing.assert_array_equal(flat, stacked)


def test_bad_heatmap_is_refused() -> None:
    findings = _findings({"Mass": 0.6})
    region = finding_region("Mass", _blob(7, (0.5, 0.5)), 400, 360)
    assert region is not None
    with pytest.raises(ValueError):
        render_heatmap_rgb(_chest_like(), {"Mass": np.zeros((2, 2, 2), np.float32)}, findings, [region])
    with pytest.raises(ValueError):
        render_heatmap_rgb(np.zeros((4, 4, 3), np.float32), {}, findings, [])
