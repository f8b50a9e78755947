"""Decoding in limited child processes: bombs cost the child, never the worker; time-outs kill it."""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.tag import Tag

from service.core.status import ReasonCode
from tests.support.hostile import chest_cr, save, with_bomb
from tests.support.paths import CHEST_DICOM
from worker.dicom.decoder import DecodeLimits, DecodeTimeout, IsolatedDecoder
from worker.dicom.gate import SizeLimits, check_size
from worker.dicom.pixels import PixelDataError, read_display_pixels

GiB = 1024**3


@pytest.fixture
def decoder(tmp_path: Path) -> Iterator[IsolatedDecoder]:
    dec = IsolatedDecoder(tmp_path / "scratch", DecodeLimits(timeout_seconds=60, memory_bytes=GiB))
    yield dec
    dec.close()


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_decoded_pixels_are_those_of_the_in_process_reader(
    decoder: IsolatedDecoder, shared_dir: Path
) -> None:
    path = CHEST_DICOM / "cr-pa-mono1-j2k-lossless.dcm"
    isolated = decoder.decode(path)
    direct = read_display_pixels(pydicom.dcmread(path))
    np.testing.assert_array_equal(isolated.pixels, direct.pixels)
    assert isolated.inverted_by_label and not isolated.inverted_by_heuristic
    assert not any((decoder.scratch_dir).iterdir()), "the .npy hand-over file must not outlive the call"


def test_a_bomb_over_the_address_space_limit_costs_the_child_only(
    decoder: IsolatedDecoder, shared_dir: Path, tmp_path: Path
) -> None:
    """12000 x 12000 declared in 149 bytes: in-process this decoded to a blank image at 4.1 GB RSS."""
    bomb = save(with_bomb(chest_cr(), 12000, 12000), tmp_path / "bomb.dcm")
    before = _peak_rss_mb()
    with pytest.raises(PixelDataError) as caught:
        decoder.decode(bomb)
    assert caught.value.reason in {ReasonCode.PIXEL_DECODE_MEMORY, ReasonCode.PIXEL_DECODE_ERROR}
    assert _peak_rss_mb() - before < 100
    # The next image decodes in a fresh child.
    assert decoder.decode(CHEST_DICOM / "sc-pa-jpeg-baseline.dcm").pixels.shape == (1024, 1024)


def test_a_codestream_larger_than_its_header_is_refused_before_decoding(
    decoder: IsolatedDecoder, tmp_path: Path
) -> None:
    """Header 512 x 512, codestream 65000 x 65000: in-process this took 10.9 s and 8.5 GB RSS."""
    bomb = save(with_bomb(chest_cr(), 65000, 65000, header=(512, 512)), tmp_path / "bomb.dcm")
    t0 = time.monotonic()
    with pytest.raises(PixelDataError) as caught:
        decoder.decode(bomb)
    assert caught.value.reason == ReasonCode.PIXEL_MODULE_INCONSISTENT
    assert time.monotonic() - t0 < 10


def test_the_header_limits_refuse_a_bomb_before_any_decode() -> None:
    limits = SizeLimits(max_image_pixels=50_000_000, max_instance_bytes=GiB)
    bomb = with_bomb(chest_cr(), 65000, 65000)
    assert check_size(bomb, 1096, limits).reason == ReasonCode.IMAGE_TOO_LARGE
    frames = chest_cr()
    frames.Rows = frames.Columns = 4096
    frames.NumberOfFrames = 3
    assert check_size(frames, 1000, limits).reason == ReasonCode.IMAGE_TOO_LARGE
    assert check_size(chest_cr(), GiB + 1, limits).reason == ReasonCode.INSTANCE_TOO_LARGE
    assert check_size(chest_cr(), 600_000, limits).eligible
    garbage = chest_cr()
    garbage[0x00280008] = RawDataElement(Tag(0x00280008), "IS", 4, b"many", 0, False, True)
    assert check_size(garbage, 1000, limits).reason == ReasonCode.PIXEL_MODULE_INCONSISTENT


def test_a_decode_past_the_time_limit_is_killed(tmp_path: Path, shared_dir: Path) -> None:
    decoder = IsolatedDecoder(tmp_path / "scratch", DecodeLimits(timeout_seconds=0.05, memory_bytes=GiB))
    try:
        t0 = time.monotonic()
        with pytest.raises(DecodeTimeout):
            decoder.decode(CHEST_DICOM / "cr-pa-mono1-j2k-lossless.dcm")
        assert time.monotonic() - t0 < 30
        assert not decoder._idle, "a timed-out child is killed, never reused"
    finally:
        decoder.close()


def test_a_child_that_dies_is_a_decode_error_and_is_replaced(
    decoder: IsolatedDecoder, shared_dir: Path
) -> None:
    path = CHEST_DICOM / "sc-pa-jpeg-baseline.dcm"
    decoder.decode(path)
    (child,) = decoder._idle
    child.proc.kill()
    child.proc.wait()
    # A dead child found in the pool is skipped: a new one decodes.
    assert decoder.decode(path).pixels.shape == (1024, 1024)
    assert decoder._idle and decoder._idle[0] is not child


def test_garbage_is_a_decode_error_not_a_crash(decoder: IsolatedDecoder, tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + b"\xff" * 64)
    with pytest.raises(PixelDataError) as caught:
        decoder.decode(junk)
    assert caught.value.reason in {ReasonCode.PIXEL_DECODE_ERROR, ReasonCode.NOT_IMAGE_OBJECT}
