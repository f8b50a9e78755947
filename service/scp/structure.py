"""Structural check of a received Part 10 file without reading its values into memory.

pydicom reads a truncated dataset without complaint (a short Pixel Data value is just shorter), so the
listener walks the encoding itself: every element's length must fit, undefined-length sequences, items and
encapsulated Pixel Data must close with their delimiters, and the data must end exactly at the end of the
file. Values are skipped by seeking, so an 8 MB image costs a few hundred small reads. Pixel data are not
decoded here: decoding belongs to the worker.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path
from typing import BinaryIO

IMPLICIT_VR_LE = "1.2.840.10008.1.2"
EXPLICIT_VR_BE = "1.2.840.10008.1.2.2"
DEFLATED_EXPLICIT_VR_LE = "1.2.840.10008.1.2.1.99"

UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITER = 0xFFFEE00D
SEQUENCE_DELIMITER = 0xFFFEE0DD
PIXEL_DATA = 0x7FE00010
# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
)
# Nesting deeper than this is not a real dataset, and would exhaust the stack.
_MAX_DEPTH = 32
_CHUNK = 1 << 16


class MalformedDataset(ValueError):
    """The received bytes are not a well-formed DICOM dataset (truncated, garbage, wrong lengths)."""


class _FileReader:
    def __init__(self, fh: BinaryIO, size: int) -> None:
        self._fh = fh
        self.size = size
        self.pos = fh.tell()

    def read(self, n: int) -> bytes:
        data = self._fh.read(n)
        self.pos += len(data)
        return data

    def skip(self, n: int) -> None:
        if self.pos + n > self.size:
            raise MalformedDataset("value runs past the end of the data")
        self.pos += n
        self._fh.seek(self.pos)

    def at_end(self) -> bool:
        return self.pos >= self.size


class _InflateReader:
    """Forward-only reader over a raw-deflate stream; inflates at most one chunk per step (zip bombs)."""

    def __init__(self, fh: BinaryIO) -> None:
        self._fh = fh
        self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = b""
        self._eof = False
        self.pos = 0

    def _fill(self, want: int) -> None:
        try:
            while len(self._buf) < want and not self._eof:
                if self._inflate.unconsumed_tail:
                    self._buf += self._inflate.decompress(self._inflate.unconsumed_tail, _CHUNK)
                else:
                    raw = self._fh.read(_CHUNK)
                    if raw:
                        self._buf += self._inflate.decompress(raw, _CHUNK)
                    else:
                        self._buf += self._inflate.flush()
                        self._eof = True
                if self._inflate.eof:
                    self._eof = True
        except zlib.error as exc:
            raise MalformedDataset("deflate stream is corrupt") from exc

    def read(self, n: int) -> bytes:
        self._fill(n)
        data, self._buf = self._buf[:n], self._buf[n:]
        self.pos += len(data)
        return data

    def skip(self, n: int) -> None:
        while n > 0:
            step = min(n, _CHUNK)
            if len(self.read(step)) < step:
                raise MalformedDataset("value runs past the end of the data")
            n -= step

    def at_end(self) -> bool:
        self._fill(1)
        return not self._buf


_Reader = _FileReader | _InflateReader


class _Walker:
    def __init__(self, reader: _Reader, *, implicit: bool, little: bool) -> None:
        self.r = reader
        self.implicit = implicit
        e = "<" if little else ">"
        self.tag_fmt = struct.Struct(f"{e}HH")
        self.u16 = struct.Struct(f"{e}H")
        self.u32 = struct.Struct(f"{e}L")

    def _exact(self, n: int) -> bytes:
        data = self.r.read(n)
        if len(data) != n:
            raise MalformedDataset("data ends inside an element header")
        return data

    def _tag(self) -> int:
        group, elem = self.tag_fmt.unpack(self._exact(4))
        return int(group) << 16 | int(elem)

    def dataset(self, depth: int, end: int | None, delimiter: int | None) -> None:
        """Walk elements until ``end`` (defined-length item), ``delimiter`` or, at the top, end of data."""
        if depth > _MAX_DEPTH:
            raise MalformedDataset("sequences nested too deeply")
        while True:
            if end is not None:
                if self.r.pos == end:
                    return
                if self.r.pos > end:
                    raise MalformedDataset("element overruns its item")
            elif delimiter is None and self.r.at_end():
                return
            tag = self._tag()
            if tag >> 16 == 0xFFFE:
                (length,) = self.u32.unpack(self._exact(4))
                if tag == delimiter and end is None:
                    return
                raise MalformedDataset("unexpected item or delimiter tag")
            vr: bytes | None = None
            if self.implicit:
                (length,) = self.u32.unpack(self._exact(4))
            else:
                vr = self._exact(2)
                if vr in _LONG_VRS:
                    self._exact(2)
                    (length,) = self.u32.unpack(self._exact(4))
                elif vr.isalpha() and vr.isupper():
                    (length,) = self.u16.unpack(self._exact(2))
                else:
                    raise MalformedDataset("invalid VR")
            if length != UNDEFINED:
                self.r.skip(length)
            elif tag == PIXEL_DATA and not self.implicit:
                self._encapsulated()
            elif self.implicit or vr == b"SQ":
                self._sequence(depth + 1)
            elif vr == b"UN":
                # PS3.5 6.2.2: an undefined-length UN is a sequence encoded implicit VR little endian.
                _Walker(self.r, implicit=True, little=True)._sequence(depth + 1)
            else:
                raise MalformedDataset("undefined length on a VR that cannot have one")

    def _sequence(self, depth: int) -> None:
        while True:
            tag = self._tag()
            (length,) = self.u32.unpack(self._exact(4))
            if tag == SEQUENCE_DELIMITER:
                return
            if tag != ITEM:
                raise MalformedDataset("sequence holds something other than items")
            if length == UNDEFINED:
                self.dataset(depth, None, ITEM_DELIMITER)
            else:
                self.dataset(depth, self.r.pos + length, None)

    def _encapsulated(self) -> None:
        while True:
            tag = self._tag()
            (length,) = self.u32.unpack(self._exact(4))
            if tag == SEQUENCE_DELIMITER:
                return
            if tag != ITEM or length == UNDEFINED:
                raise MalformedDataset("encapsulated pixel data fragment is malformed")
            self.r.skip(length)


def _file_meta(fh: BinaryIO, size: int) -> str:
    """Skip preamble and file meta (explicit VR LE, group 0002); return the transfer syntax UID."""
    head = fh.read(132)
    if len(head) != 132 or head[128:] != b"DICM":
        raise MalformedDataset("no DICM prefix")
    syntax: str | None = None
    while True:
        start = fh.tell()
        header = fh.read(8)
        if len(header) < 8:
            break
        group, elem = struct.unpack("<HH", header[:4])
        if group != 0x0002:
            fh.seek(start)
            break
        vr = header[4:6]
        if vr in _LONG_VRS:
            ext = fh.read(4)
            if len(ext) != 4:
                raise MalformedDataset("file meta truncated")
            (length,) = struct.unpack("<L", ext)
        else:
            (length,) = struct.unpack("<H", header[6:8])
        if length == UNDEFINED or fh.tell() + length > size:
            raise MalformedDataset("file meta element overruns the file")
        value = fh.read(length)
        if elem == 0x0010:
            syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")
    if not syntax:
        raise MalformedDataset("file meta has no transfer syntax")
    return syntax


def check_file(path: Path) -> str:
    """Raise :class:`MalformedDataset` unless ``path`` is a well-formed Part 10 file; return its syntax."""
    size = path.stat().st_size
    with path.open("rb") as fh:
        syntax = _file_meta(fh, size)
        reader: _Reader = _InflateReader(fh) if syntax == DEFLATED_EXPLICIT_VR_LE else _FileReader(fh, size)
        walker = _Walker(reader, implicit=syntax == IMPLICIT_VR_LE, little=syntax != EXPLICIT_VR_BE)
        if reader.at_end():
            raise MalformedDataset("empty dataset")
        walker.dataset(0, None, None)
    return syntax
