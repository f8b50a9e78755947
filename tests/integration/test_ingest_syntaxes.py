"""Every transfer syntax a PACS may use arrives intact: DCMTK makes them, storescu sends each as-is.

The spooled file must decode (pydicom + pylibjpeg/openjpeg/rle) and, for lossless syntaxes, to exactly the
pixels of the original.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import JPEG2000, JPEG2000Lossless, generate_uid

from service.listener_main import Listener
from tests.support.dcmtk import storescu
from tests.support.ingest import ingest_settings, instances, running_listener
from tests.support.peers import tool

SOURCE = "dicom/chest/cr-pa-mono1-explicit-le.dcm"


@dataclass(frozen=True)
class Variant:
    syntax: str
    lossless: bool
    make: Callable[[Path, Path], None]  # (explicit LE input, output)
    # Uncompressed files are offered in all three uncompressed syntaxes and we pick explicit LE; these
    # storescu options make it propose only (implicit) or first (big endian) the syntax under test.
    storescu_args: tuple[str, ...] = ()


def _dcmtk(*args: str) -> Callable[[Path, Path], None]:
    def make(src: Path, dst: Path) -> None:
        name, *options = args
        subprocess.run(
            [tool(name, "dcmtk"), *options, str(src), str(dst)], check=True, capture_output=True, timeout=120
        )

    return make


def _copy(src: Path, dst: Path) -> None:
    shutil.copy(src, dst)


def _pydicom_j2k(syntax: str, **options: object) -> Callable[[Path, Path], None]:
    def make(src: Path, dst: Path) -> None:
        ds = dcmread(src)
        ds.compress(syntax, **options)
        ds.save_as(dst, enforce_file_format=True)

    return make


VARIANTS = {
    "implicit-vr-le": Variant("1.2.840.10008.1.2", True, _dcmtk("dcmconv", "+ti"), ("-xi",)),
    "explicit-vr-le": Variant("1.2.840.10008.1.2.1", True, _copy),
    "deflated-explicit-vr-le": Variant("1.2.840.10008.1.2.1.99", True, _dcmtk("dcmconv", "+td")),
    "explicit-vr-be": Variant("1.2.840.10008.1.2.2", True, _dcmtk("dcmconv", "+tb"), ("-xb",)),
    "rle": Variant("1.2.840.10008.1.2.5", True, _dcmtk("dcmcrle")),
    "jpeg-baseline": Variant("1.2.840.10008.1.2.4.50", False, _dcmtk("dcmcjpeg", "+eb")),
    "jpeg-extended": Variant("1.2.840.10008.1.2.4.51", False, _dcmtk("dcmcjpeg", "+ee")),
    "jpeg-lossless-sv1": Variant("1.2.840.10008.1.2.4.70", True, _dcmtk("dcmcjpeg", "+e1")),
    "jpeg-ls-lossless": Variant("1.2.840.10008.1.2.4.80", True, _dcmtk("dcmcjpls", "+el")),
    "jpeg-ls-near-lossless": Variant("1.2.840.10008.1.2.4.81", False, _dcmtk("dcmcjpls", "+en")),
    "jpeg2000-lossless": Variant(str(JPEG2000Lossless), True, _pydicom_j2k(JPEG2000Lossless)),
    "jpeg2000": Variant(str(JPEG2000), False, _pydicom_j2k(JPEG2000, j2k_cr=[20])),
}


@pytest.fixture(scope="module")
def original(shared_dir: Path) -> np.ndarray:
    return dcmread(shared_dir / SOURCE).pixel_array


@pytest.fixture(scope="module")
def encoded(shared_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each variant of the CR, with its own study and instance UIDs, in a temp dir (made once)."""
    out = tmp_path_factory.mktemp("syntaxes")
    made: dict[str, Path] = {}
    for name, variant in VARIANTS.items():
        base = dcmread(shared_dir / SOURCE)
        base.StudyInstanceUID = generate_uid()
        base.SeriesInstanceUID = generate_uid()
        base.SOPInstanceUID = base.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        src = out / f"{name}-input.dcm"
        base.save_as(src, enforce_file_format=True)
        dst = out / f"{name}.dcm"
        variant.make(src, dst)
        made[name] = dst
    return made


@pytest.fixture(scope="module")
def listener(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Listener]:
    with running_listener(ingest_settings(tmp_path_factory.mktemp("listener"))) as lst:
        yield lst


@pytest.mark.parametrize("name", list(VARIANTS))
def test_transfer_syntax_is_accepted_stored_and_decodes(
    name: str, encoded: dict[str, Path], listener: Listener, original: np.ndarray
) -> None:
    variant = VARIANTS[name]
    path = encoded[name]
    sent_meta = dcmread(path, stop_before_pixels=True)
    assert str(sent_meta.file_meta.TransferSyntaxUID) == variant.syntax, "the test file has the wrong syntax"

    result = storescu(
        "127.0.0.1",
        listener.settings.listener_port,
        [path],
        called_aet="CXR_GATEWAY",
        extra_args=variant.storescu_args,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Success" in result.stderr + result.stdout

    [inst] = [i for i in instances(listener) if i.sop_instance_uid == sent_meta.SOPInstanceUID]
    assert inst.transfer_syntax_uid == variant.syntax, "must be stored as sent, never re-encoded"
    spooled = listener.settings.spool_dir / inst.spool_path
    ds = dcmread(spooled)
    assert str(ds.file_meta.TransferSyntaxUID) == variant.syntax
    pixels = ds.pixel_array
    assert pixels.shape == original.shape
    if variant.lossless:
        np.testing.assert_array_equal(pixels, original)
