"""Display pixels from real and synthetic DICOM: LUTs, polarity (MONOCHROME1 and the label trap), errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from service.core.status import ReasonCode
from tests.support.paths import CHEST_DICOM, NIH_64PX_IMAGES, NIH_DEV_IMAGES, NOT_CHEST_DICOM, SR_DICOM
from worker.dicom.pixels import (
    DisplayImage,
    PixelDataError,
    inversion_score,
    looks_inverted,
    read_display_pixels,
)

_KNOWN_CHEST = (
    "cr-pa-mono1-explicit-le.dcm",
    "cr-pa-mono1-j2k-lossless.dcm",
    "cr-pa-mono1-j2k-lossy.dcm",
    "sc-pa-jpeg-baseline-mono1-label.dcm",
    "sc-pa-jpeg-baseline.dcm",
)
# Collected from the folder so new files are covered; the known names keep the ids when it is absent
# (the `shared_dir` fixture then skips locally and fails in CI).
CHEST_FILES = sorted(p.name for p in CHEST_DICOM.glob("*.dcm")) or list(_KNOWN_CHEST)
NOT_CHEST_FILES = sorted(p.name for p in NOT_CHEST_DICOM.glob("*.dcm")) or [
    "cr-tibia-j2k-lossless.dcm",
    "dx-canine-lateral-thorax.dcm",
]


def _read(folder: Path, name: str) -> DisplayImage:
    return read_display_pixels(pydicom.dcmread(folder / name))


@pytest.mark.parametrize("name", CHEST_FILES)
def test_chest_files_decode_to_bone_bright_unit_range(shared_dir: Path, name: str) -> None:
    ds = pydicom.dcmread(CHEST_DICOM / name)
    display = read_display_pixels(ds)
    assert display.pixels.dtype == np.float32
    assert display.pixels.shape == (ds.Rows, ds.Columns)
    assert float(display.pixels.min()) >= 0.0
    assert float(display.pixels.max()) <= 1.0
    assert float(display.pixels.std()) > 0.05
    # Every chest file ends up in the same (normal) sense: mediastinum brighter than the lungs.
    assert inversion_score(display.pixels) > 0.1
    assert not looks_inverted(display.pixels)


@pytest.mark.parametrize("name", [n for n in CHEST_FILES if n.startswith("cr-pa-mono1")])
def test_real_monochrome1_is_inverted_by_label_only(shared_dir: Path, name: str) -> None:
    display = _read(CHEST_DICOM, name)
    assert display.inverted_by_label
    assert not display.inverted_by_heuristic


def test_compressed_encodings_give_the_same_pixels(shared_dir: Path) -> None:
    explicit = _read(CHEST_DICOM, "cr-pa-mono1-explicit-le.dcm").pixels
    lossless = _read(CHEST_DICOM, "cr-pa-mono1-j2k-lossless.dcm").pixels
    lossy = _read(CHEST_DICOM, "cr-pa-mono1-j2k-lossy.dcm").pixels
    np.testing.assert_array_equal(explicit, lossless)
    assert float(np.abs(explicit - lossy).mean()) < 0.01


def test_monochrome1_label_trap_is_corrected_by_the_heuristic(shared_dir: Path) -> None:
    baseline = _read(CHEST_DICOM, "sc-pa-jpeg-baseline.dcm")
    trap = _read(CHEST_DICOM, "sc-pa-jpeg-baseline-mono1-label.dcm")
    assert not baseline.inverted_by_label and not baseline.inverted_by_heuristic
    assert trap.inverted_by_label and trap.inverted_by_heuristic
    np.testing.assert_allclose(trap.pixels, baseline.pixels, atol=1e-6)

    # Without the heuristic the label is obeyed, and the result is the negative.
    labelled = read_display_pixels(
        pydicom.dcmread(CHEST_DICOM / "sc-pa-jpeg-baseline-mono1-label.dcm"), auto_invert=False
    )
    assert labelled.inverted_by_label and not labelled.inverted_by_heuristic
    np.testing.assert_allclose(labelled.pixels, 1.0 - baseline.pixels, atol=1e-6)


@pytest.mark.parametrize("name", NOT_CHEST_FILES)
def test_not_chest_files_decode_and_honour_monochrome1(shared_dir: Path, name: str) -> None:
    ds = pydicom.dcmread(NOT_CHEST_DICOM / name)
    # The heuristic is for frontal chests only (the pipeline gates by header first), so check the label.
    display = read_display_pixels(ds, auto_invert=False)
    assert display.pixels.shape == (ds.Rows, ds.Columns)
    assert float(display.pixels.min()) >= 0.0 and float(display.pixels.max()) <= 1.0
    assert display.inverted_by_label == (ds.PhotometricInterpretation == "MONOCHROME1")
    assert not display.inverted_by_heuristic


def test_nih_png_inversion_rates(shared_dir: Path) -> None:
    """looks_inverted ~never fires on the NIH dev PNGs and ~always on their negatives."""
    files = sorted(NIH_DEV_IMAGES.glob("*.png"))
    assert len(files) == 321
    fired = fired_on_negative = 0
    for path in files:
        image = np.asarray(Image.open(path).convert("L"), dtype=np.float32) / 255.0
        fired += looks_inverted(image)
        fired_on_negative += looks_inverted(1.0 - image)
    # One NIH dev image (00017625_000.png) really is stored inverted; that is the single expected hit.
    assert fired <= 2, f"looks_inverted fired on {fired}/{len(files)} normal images"
    assert fired_on_negative >= len(files) - 2, f"missed {len(files) - fired_on_negative} negatives"


def test_nih_64px_inversion_rates_held_out(shared_dir: Path) -> None:
    """The heuristic was tuned on the dev PNGs; the 1000 tiny 64 px images are a held-out check."""
    files = sorted(NIH_64PX_IMAGES.glob("*.png"))
    assert len(files) >= 900
    images = [np.asarray(Image.open(p).convert("L"), np.float32) / 255.0 for p in files]
    fired = sum(looks_inverted(image) for image in images)
    negatives = sum(looks_inverted(1.0 - image) for image in images)
    assert fired <= len(files) // 100
    assert negatives >= len(files) - len(files) // 100


def test_inversion_score_is_antisymmetric() -> None:
    rng = np.random.default_rng(0)
    image = rng.random((64, 80)).astype(np.float32)
    assert inversion_score(image) == pytest.approx(-inversion_score(1.0 - image), abs=1e-5)
    assert inversion_score(np.zeros((64, 64), np.float32)) == 0.0
    assert not looks_inverted(np.zeros((8, 8), np.float32))


# ---------------------------------------------------------------------------------------------- synthetic


def _synthetic(
    pixels: npt.NDArray[np.integer], *, photometric: str = "MONOCHROME2", bits_stored: int = 12
) -> pydicom.Dataset:
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.astype("<u2").tobytes()
    return ds


def _ramp(rows: int = 32, columns: int = 64, top: int = 4095) -> npt.NDArray[np.uint16]:
    line = np.linspace(0, top, columns).round().astype(np.uint16)
    return np.tile(line, (rows, 1))


def test_window_maps_onto_unit_range() -> None:
    ds = _synthetic(_ramp())
    ds.WindowCenter = 2048
    ds.WindowWidth = 1024
    pixels = read_display_pixels(ds, auto_invert=False).pixels
    row = pixels[0]
    assert row[0] == 0.0 and row[-1] == 1.0
    centre = int(np.argmin(np.abs(_ramp()[0].astype(int) - 2048)))
    assert row[centre] == pytest.approx(0.5, abs=0.05)


def test_rescale_is_applied_before_the_window() -> None:
    ds = _synthetic(_ramp())
    ds.RescaleSlope = 2
    ds.RescaleIntercept = -1000
    ds.WindowCenter = 3095  # 2048 stored -> 3096 after rescale
    ds.WindowWidth = 2000
    pixels = read_display_pixels(ds, auto_invert=False).pixels
    centre = int(np.argmin(np.abs(_ramp()[0].astype(int) - 2048)))
    assert pixels[0, centre] == pytest.approx(0.5, abs=0.05)


@pytest.mark.parametrize("vr", ["US", "OW"])
def test_voi_lut_sequence_is_normalised_by_its_own_range(vr: str) -> None:
    ds = _synthetic(_ramp(top=255), bits_stored=8)
    item = pydicom.Dataset()
    item.LUTDescriptor = [256, 0, 16]  # declares 16 bits but uses 12: the common overstatement
    table = [min(4095, 16 * i) for i in range(256)]
    item.add_new("LUTData", vr, table if vr == "US" else np.asarray(table, "<u2").tobytes())
    ds.VOILUTSequence = [item]
    pixels = read_display_pixels(ds, auto_invert=False).pixels
    assert pixels[0, 0] == 0.0 and pixels[0, -1] == 1.0
    assert np.all(np.diff(pixels[0]) >= 0)


def test_percentile_stretch_without_voi() -> None:
    image = _ramp()
    image[0, 0] = 4095  # a single hot pixel must not set the scale
    pixels = read_display_pixels(_synthetic(image), auto_invert=False).pixels
    assert pixels.min() == 0.0 and pixels.max() == 1.0
    assert float((pixels == 1.0).mean()) < 0.05


def test_monochrome1_synthetic_is_inverted() -> None:
    ds = _synthetic(_ramp(), photometric="MONOCHROME1")
    ds.WindowCenter = 2048
    ds.WindowWidth = 4096
    display = read_display_pixels(ds, auto_invert=False)
    assert display.inverted_by_label
    assert display.pixels[0, 0] == pytest.approx(1.0, abs=0.01)
    assert display.pixels[0, -1] == pytest.approx(0.0, abs=0.01)


def test_single_frame_number_of_frames_is_accepted() -> None:
    ds = _synthetic(_ramp())
    ds.NumberOfFrames = 1
    assert read_display_pixels(ds, auto_invert=False).pixels.shape == (32, 64)


def test_pixel_data_error_is_a_value_error() -> None:
    # Callers that catch ValueError keep working.
    assert issubclass(PixelDataError, ValueError)
    assert str(PixelDataError(ReasonCode.NOT_2D_GREY, "x")) == "not_2d_grey: x"


def _reason(ds: pydicom.Dataset) -> ReasonCode:
    with pytest.raises(PixelDataError) as caught:
        read_display_pixels(ds)
    error: PixelDataError = caught.value
    assert error.reason in set(ReasonCode)
    return error.reason


def test_no_pixel_data_at_all(shared_dir: Path) -> None:
    assert _reason(pydicom.dcmread(SR_DICOM / "tid1500-example.dcm")) == ReasonCode.NOT_IMAGE_OBJECT


def test_pixel_module_without_pixel_data() -> None:
    ds = _synthetic(_ramp())
    del ds.PixelData
    assert _reason(ds) == ReasonCode.PIXEL_MODULE_INCONSISTENT


def test_colour_image_is_rejected() -> None:
    ds = _synthetic(_ramp())
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    assert _reason(ds) == ReasonCode.NOT_2D_GREY


def test_multi_frame_is_rejected() -> None:
    ds = _synthetic(np.concatenate([_ramp(), _ramp()]))
    ds.Rows = 32
    ds.NumberOfFrames = 2
    assert _reason(ds) == ReasonCode.NOT_2D_GREY


def test_truncated_pixel_data_is_inconsistent() -> None:
    ds = _synthetic(_ramp())
    ds.Rows = 320  # ten times what the bytes hold
    assert _reason(ds) == ReasonCode.PIXEL_MODULE_INCONSISTENT


def test_high_bit_beyond_bits_allocated_is_inconsistent() -> None:
    ds = _synthetic(_ramp())
    ds.HighBit = 16
    assert _reason(ds) == ReasonCode.PIXEL_MODULE_INCONSISTENT


def test_corrupt_jpeg_is_a_decode_error(shared_dir: Path) -> None:
    ds = pydicom.dcmread(CHEST_DICOM / "sc-pa-jpeg-baseline.dcm")
    # JPEG decoders shrug off a damaged scan (they fill in grey), but not a stream that ends after SOI.
    ds.PixelData = pydicom.encaps.encapsulate([b"\xff\xd8\xff\xe0" + b"\x00" * 10])
    assert _reason(ds) == ReasonCode.PIXEL_DECODE_ERROR


# ---------------------------------------------------------------------------------------------- not an image


def _real(**attrs: object) -> pydicom.Dataset:
    """A real NIH chest X-ray as 12-bit stored values, with header attributes set raw (any string)."""
    from tests.support.hostile import nih_pixels

    ds = _synthetic(nih_pixels())
    for keyword, value in attrs.items():
        ds.add_new(keyword, pydicom.datadict.dictionary_VR(keyword), value)
    return ds


@pytest.mark.parametrize(
    ("attrs", "reason"),
    [
        ({"RescaleSlope": "NaN"}, ReasonCode.RESCALE_INVALID),
        ({"RescaleSlope": "0"}, ReasonCode.RESCALE_INVALID),
        ({"RescaleSlope": "inf", "RescaleIntercept": "0"}, ReasonCode.RESCALE_INVALID),
        ({"RescaleSlope": "1", "RescaleIntercept": "-inf"}, ReasonCode.RESCALE_INVALID),
        (
            {"RescaleSlope": "1e308", "RescaleIntercept": "0"},
            ReasonCode.RESCALE_INVALID,
        ),  # overflows to inf on the way
        ({"RescaleSlope": "1e12", "RescaleIntercept": "0"}, ReasonCode.DYNAMIC_RANGE_ABSURD),
        ({"WindowCenter": "NaN", "WindowWidth": "400"}, ReasonCode.WINDOW_INVALID),
        ({"WindowCenter": "2048", "WindowWidth": "0"}, ReasonCode.WINDOW_INVALID),
        ({"WindowCenter": "2048", "WindowWidth": "-5"}, ReasonCode.WINDOW_INVALID),
        ({"WindowCenter": "2048", "WindowWidth": "0.5"}, ReasonCode.WINDOW_INVALID),
        # A window far off the data saturates every pixel: one grey.
        ({"WindowCenter": "90000", "WindowWidth": "10"}, ReasonCode.IMAGE_BLANK),
        ({"WindowCenter": "-90000", "WindowWidth": "10"}, ReasonCode.IMAGE_BLANK),
    ],
)
def test_pixels_that_are_not_an_image_are_refused_with_a_reason(
    shared_dir: Path, attrs: dict[str, str], reason: ReasonCode
) -> None:
    """Before: a NaN slope rendered an all-black image, analysed with 8 findings "present"."""
    with pytest.raises(PixelDataError) as caught:
        read_display_pixels(_real(**attrs))
    assert caught.value.reason == reason


@pytest.mark.parametrize("value", [0, 4095])
def test_a_constant_image_is_blank(value: int) -> None:
    with pytest.raises(PixelDataError) as caught:
        read_display_pixels(_synthetic(np.full((300, 300), value, np.uint16)))
    assert caught.value.reason == ReasonCode.IMAGE_BLANK


def test_a_nearly_constant_image_is_blank() -> None:
    image = np.full((300, 300), 1000, np.uint16)
    image[:5, :5] = 4000  # a marker in a corner is no anatomy
    with pytest.raises(PixelDataError) as caught:
        read_display_pixels(_synthetic(image))
    assert caught.value.reason == ReasonCode.IMAGE_BLANK


def test_valid_rescale_and_windows_still_render(shared_dir: Path) -> None:
    ds = _real(RescaleSlope="2", RescaleIntercept="-1024", WindowCenter="3072", WindowWidth="8192")
    assert float(read_display_pixels(ds).pixels.std()) > 0.05


def test_a_codestream_that_declares_another_size_is_inconsistent(shared_dir: Path) -> None:
    from tests.support.hostile import chest_cr, with_bomb

    ds = with_bomb(chest_cr(), 65000, 65000, header=(512, 512))
    with pytest.raises(PixelDataError) as caught:
        read_display_pixels(ds)
    assert caught.value.reason == ReasonCode.PIXEL_MODULE_INCONSISTENT
    assert "65000" in str(caught.value)
