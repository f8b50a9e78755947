"""The structural check catches what pydicom reads without complaint: truncation, bad lengths, garbage."""

from __future__ import annotations

import io
import zlib
from pathlib import Path

import pytest
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom.dsutils import encode

from service.scp.structure import MalformedDataset, check_file


def _dataset() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    # Fixed, not generated: _body and _boundaries each build the data set, and a random UID's length
    # (odd ones are padded) made the two disagree now and then.
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.12345678901234567"
    ds.PatientName = "TEST^STRUCTURE"
    item = Dataset()
    item.CodeValue = "T-D3000"
    item.CodingSchemeDesignator = "SRT"
    ds.AnatomicRegionSequence = Sequence([item, Dataset()])
    ds.Rows = ds.Columns = 16
    ds.BitsAllocated = 16
    ds.add_new(0x7FE00010, "OW", bytes(range(256)) * 2)  # VR given: no ambiguity to resolve per element
    return ds


def _file(tmp_path: Path, syntax: str, body: bytes, name: str = "x.dcm") -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = syntax
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta)
    buf.write(body)
    path = tmp_path / name
    path.write_bytes(buf.getvalue())
    return path


def _body(syntax: str) -> bytes:
    ds = _dataset()
    if syntax == DeflatedExplicitVRLittleEndian:
        raw = encode(ds, False, True)
        assert raw is not None
        comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        return comp.compress(raw) + comp.flush()
    implicit = syntax == ImplicitVRLittleEndian
    little = syntax != ExplicitVRBigEndian
    body = encode(ds, implicit, little)
    assert body is not None
    return body


SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    ExplicitVRBigEndian,
    DeflatedExplicitVRLittleEndian,
]


@pytest.mark.parametrize("syntax", SYNTAXES)
def test_well_formed_datasets_pass(tmp_path: Path, syntax: str) -> None:
    assert check_file(_file(tmp_path, syntax, _body(syntax))) == syntax


def _boundaries(syntax: str) -> set[int]:
    """Offsets where a top-level element ends: cutting there leaves a shorter but well-formed data set."""
    ds = _dataset()
    ends, offset = set(), 0
    for elem in ds:
        single = Dataset()
        single.add(elem)
        encoded = encode(single, syntax == ImplicitVRLittleEndian, syntax != ExplicitVRBigEndian)
        assert encoded is not None
        offset += len(encoded)
        ends.add(offset)
    return ends


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian])
def test_every_cut_inside_an_element_is_caught(tmp_path: Path, syntax: str) -> None:
    body = _body(syntax)
    boundaries = _boundaries(syntax)
    assert max(boundaries) == len(body)
    for keep in range(len(body)):
        path = _file(tmp_path, syntax, body[:keep])
        if keep in boundaries:
            check_file(path)
        else:
            with pytest.raises(MalformedDataset):
                check_file(path)


def test_truncated_deflate_stream_is_caught(tmp_path: Path) -> None:
    body = _body(DeflatedExplicitVRLittleEndian)
    for keep in (1, 5, len(body) // 2, len(body) - 3):
        with pytest.raises(MalformedDataset):
            check_file(_file(tmp_path, DeflatedExplicitVRLittleEndian, body[:keep]))


def test_undefined_length_sequences_and_encapsulated_pixels(tmp_path: Path) -> None:
    def el(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
        if vr in (b"OB", b"SQ", b"UN"):
            return (
                group.to_bytes(2, "little")
                + elem.to_bytes(2, "little")
                + vr
                + b"\0\0"
                + len(value).to_bytes(4, "little")
                + value
            )
        return (
            group.to_bytes(2, "little")
            + elem.to_bytes(2, "little")
            + vr
            + len(value).to_bytes(2, "little")
            + value
        )

    def tag(group: int, elem: int, length: int) -> bytes:
        return group.to_bytes(2, "little") + elem.to_bytes(2, "little") + length.to_bytes(4, "little")

    undefined = 0xFFFFFFFF
    item = el(0x0008, 0x0100, b"SH", b"T-D3000 ")
    sequence = (
        b"\x08\x00\x18\x22SQ\0\0"
        + undefined.to_bytes(4, "little")
        + tag(0xFFFE, 0xE000, undefined)
        + item
        + tag(0xFFFE, 0xE00D, 0)
        + tag(0xFFFE, 0xE000, len(item))
        + item
        + tag(0xFFFE, 0xE0DD, 0)
    )
    # An undefined-length UN holds an implicit VR sequence (PS3.5 6.2.2).
    implicit_item = (
        (0x0008).to_bytes(2, "little")
        + (0x0100).to_bytes(2, "little")
        + (8).to_bytes(4, "little")
        + b"T-D3000 "
    )
    unknown = (
        b"\x09\x00\x10\x10UN\0\0"
        + undefined.to_bytes(4, "little")
        + tag(0xFFFE, 0xE000, undefined)
        + implicit_item
        + tag(0xFFFE, 0xE00D, 0)
        + tag(0xFFFE, 0xE0DD, 0)
    )
    fragments = tag(0xFFFE, 0xE000, 0) + tag(0xFFFE, 0xE000, 4) + b"\xff\xd8\xff\xd9" + tag(0xFFFE, 0xE0DD, 0)
    pixels = b"\xe0\x7f\x10\x00OB\0\0" + undefined.to_bytes(4, "little") + fragments
    body = sequence + unknown + pixels
    assert check_file(_file(tmp_path, RLELossless, body)) == RLELossless
    boundaries = {0, len(sequence), len(sequence) + len(unknown)}
    for keep in range(1, len(body)):
        if keep in boundaries:
            continue
        with pytest.raises(MalformedDataset):
            check_file(_file(tmp_path, RLELossless, body[:keep]))
    # A fragment item without a closing sequence delimiter, followed by junk.
    with pytest.raises(MalformedDataset):
        check_file(_file(tmp_path, RLELossless, sequence + pixels[:-8] + b"\x01\x02\x03\x04\x05\x06\x07\x08"))


def test_garbage_and_missing_prefix(tmp_path: Path) -> None:
    noise = bytes((i * 7919 + 13) % 251 for i in range(4096))
    with pytest.raises(MalformedDataset):
        check_file(_file(tmp_path, ExplicitVRLittleEndian, noise))
    with pytest.raises(MalformedDataset):
        check_file(_file(tmp_path, ExplicitVRLittleEndian, b""))
    plain = tmp_path / "plain.bin"
    plain.write_bytes(b"not dicom at all" * 20)
    with pytest.raises(MalformedDataset):
        check_file(plain)
    with pytest.raises(MalformedDataset):
        check_file(_file(tmp_path, DeflatedExplicitVRLittleEndian, noise))


def test_deflate_bomb_is_walked_in_bounded_memory(tmp_path: Path) -> None:
    # 64 MiB of zeros deflate to ~64 KiB: one huge OB element; walking it must not inflate it all at once.
    value_len = 64 * 2**20
    header = b"\xe0\x7f\x10\x00OB\0\0" + value_len.to_bytes(4, "little")
    comp = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = comp.compress(header)
    zeros = bytes(2**20)
    for _ in range(64):
        body += comp.compress(zeros)
    body += comp.flush()
    import tracemalloc

    path = _file(tmp_path, DeflatedExplicitVRLittleEndian, body)
    tracemalloc.start()
    try:
        check_file(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20
