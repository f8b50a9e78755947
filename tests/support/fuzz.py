"""A seeded, grammar-aware fuzzing corpus: mutations of real DICOM data sets and of PDU sequences.

Data sets start from real objects (the shared chest JPEG and JPEG 2000 images, a dog's DX, a TID 1500
SR) and from NIH chest X-rays written as CR in several transfer syntaxes (native explicit and implicit
little endian, deflated, JPEG 2000, RLE). Each case gets fresh UIDs, then one or two mutations that know
the encoding: element lengths, VRs, nesting, the Image Pixel module, rescale and window values, header
values, the transfer syntax the data set is sent under, encapsulated fragments (offset table, fragment
lengths, delimiters, codestreams that declare other sizes), truncation and byte flips.

PDU cases start from valid exchanges (association, C-ECHO, C-STORE, release) and mutate PDU types,
lengths, item types and lengths inside the A-ASSOCIATE-RQ, PDV lengths, context IDs and control bits,
or cut, repeat and splice them.
"""

from __future__ import annotations

import random
import struct
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import openjpeg
from pydicom import Dataset, dcmread
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    generate_uid,
)
from pynetdicom.dsutils import encode

from tests.support import pdu as P
from tests.support.hostile import chest_cr, j2k_bomb, nih_pixels
from tests.support.paths import CHEST_DICOM, NOT_CHEST_DICOM, SR_DICOM

SYNTAXES = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
)
ENCAPSULATED = frozenset({JPEG2000Lossless, JPEGBaseline8Bit, RLELossless})


@dataclass(frozen=True)
class DatasetCase:
    name: str
    sop_class: str
    sop_instance: str
    syntax: str  # the transfer syntax the data set is sent under (its context's)
    body: bytes  # the data set as sent (no file meta)


@dataclass(frozen=True)
class PduCase:
    name: str
    steps: tuple[bytes, ...]  # sent in order; the connection is half-closed after the last


# ---------------------------------------------------------------------------------------------- bases


@cache
def _file_base(path: Path) -> Dataset:
    return dcmread(path)


def _synthetic(syntax: str, index: int) -> Dataset:
    ds = chest_cr(nih_pixels(index, side=256))
    if syntax == JPEG2000Lossless:
        pixels = np.frombuffer(ds.PixelData, "<u2").reshape(256, 256)
        stream = openjpeg.encode(pixels, codec_format=0, bits_stored=12)  # type: ignore[attr-defined]
        ds.PixelData = encapsulate([bytes(stream)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    elif syntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _base(rng: random.Random) -> tuple[Dataset, str]:
    """A fresh copy of a base data set, and its own transfer syntax."""
    roll = rng.random()
    if roll < 0.55:
        syntax = rng.choice(
            [
                ExplicitVRLittleEndian,
                ImplicitVRLittleEndian,
                DeflatedExplicitVRLittleEndian,
                JPEG2000Lossless,
                RLELossless,
            ]
        )
        ds = _synthetic(syntax, rng.randrange(300))
    else:
        path = rng.choices(
            [
                CHEST_DICOM / "sc-pa-jpeg-baseline.dcm",
                CHEST_DICOM / "sc-pa-jpeg-baseline-mono1-label.dcm",
                NOT_CHEST_DICOM / "dx-canine-lateral-thorax.dcm",
                SR_DICOM / "tid1500-example.dcm",
                CHEST_DICOM / "cr-pa-mono1-j2k-lossy.dcm",
            ],
            weights=[6, 2, 3, 3, 1],
        )[0]
        ds = _file_base(path).copy()
        ds.file_meta = _file_base(path).file_meta.copy()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    return ds, str(ds.file_meta.TransferSyntaxUID)


def _encode(ds: Dataset, syntax: str) -> bytes:
    implicit = syntax == ImplicitVRLittleEndian
    body = encode(ds, implicit, True)
    assert body is not None
    if syntax == DeflatedExplicitVRLittleEndian:
        deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
        body = deflate.compress(body) + deflate.flush()
    return body


# -------------------------------------------------------------------------------------- data set mutations

_NASTY_TEXT = [
    "",
    " ",
    "chest ",
    "nan",
    "inf",
    "-1e999",
    "0",
    "-0",
    "1e308",
    "\x00\x00",
    "x\x01y",
    "a\\b\\c\\d",
    "é漢字",
    "A" * 300,
    "2024.13.45",
    "25:61:61",
    "^^^^^^^^",
    "1.02.3",
]
_PIXEL_EDGES = {
    "Rows": [0, 1, 2, 255, 65535],
    "Columns": [0, 1, 2, 255, 65535],
    "BitsAllocated": [0, 1, 7, 12, 32, 64],
    "BitsStored": [0, 1, 17, 33],
    "HighBit": [0, 7, 31, 40],
    "PixelRepresentation": [1, 2, 255],
    "SamplesPerPixel": [0, 2, 3, 4],
    "PlanarConfiguration": [1, 2],
    "NumberOfFrames": ["0", "2", "-1", "999999", "x"],
    "PhotometricInterpretation": ["RGB", "YBR_FULL", "PALETTE COLOR", "MONOCHROME3", "", "monochrome2"],
}
_HEADER_KEYWORDS = [
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "ReferringPhysicianName",
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PatientOrientation",
    "Laterality",
    "ImageLaterality",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "SpecificCharacterSet",
    "LossyImageCompression",
    "PatientSpeciesDescription",
]


def _set_raw(ds: Dataset, keyword: str, value: object) -> None:
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.dataelem import RawDataElement
    from pydicom.tag import Tag

    tag = Tag(tag_for_keyword(keyword))
    vr = dictionary_VR(tag)
    if vr in ("US", "SS"):
        raw = struct.pack("<H" if vr == "US" else "<h", int(value) & 0xFFFF if vr == "US" else int(value))  # type: ignore[call-overload]
    elif vr == "UL":
        raw = struct.pack("<L", int(value) & 0xFFFFFFFF)  # type: ignore[call-overload]
    else:
        raw = str(value).encode("utf-8", "replace")
        raw += b" " * (len(raw) % 2)
    ds[tag] = RawDataElement(tag, vr, len(raw), raw, 0, False, True)


def _mutate_dataset(ds: Dataset, rng: random.Random) -> str:
    """Mutations made on the data set before it is encoded; returns their name."""
    kind = rng.choice(["pixel", "header", "rescale", "window", "nest", "remove", "bomb", "none"])
    if kind == "pixel":
        keyword = rng.choice(list(_PIXEL_EDGES))
        _set_raw(ds, keyword, rng.choice(_PIXEL_EDGES[keyword]))
        return f"pixel:{keyword}"
    if kind == "header":
        for keyword in rng.sample(_HEADER_KEYWORDS, rng.randint(1, 5)):
            _set_raw(ds, keyword, rng.choice(_NASTY_TEXT))
        return "header"
    if kind == "rescale":
        _set_raw(ds, "RescaleSlope", rng.choice(["NaN", "0", "inf", "1e300", "-1", "1e-300", "abc"]))
        _set_raw(ds, "RescaleIntercept", rng.choice(["0", "-inf", "1e300", "NaN"]))
        return "rescale"
    if kind == "window":
        _set_raw(ds, "WindowCenter", rng.choice(["NaN", "1e9", "-1e9", "0", "x"]))
        _set_raw(ds, "WindowWidth", rng.choice(["0", "-5", "NaN", "0.5", "1e30"]))
        return "window"
    if kind == "nest":
        depth = rng.choice([2, 8, 31, 33, 64, 200])
        inner = Dataset()
        inner.CodeValue = "X"
        for _ in range(depth):
            outer = Dataset()
            outer.ReferencedImageSequence = [inner]
            inner = outer
        ds.ReferencedImageSequence = inner.ReferencedImageSequence
        return f"nest:{depth}"
    if kind == "remove":
        for keyword in rng.sample(
            ["Rows", "Columns", "BitsAllocated", "PhotometricInterpretation", "Modality", "SOPClassUID"], 2
        ):
            if keyword in ds:
                delattr(ds, keyword)
        return "remove"
    if kind == "bomb" and "Rows" in ds:
        side = rng.choice([20000, 65000])
        ds.PixelData = encapsulate([j2k_bomb(side, side)])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
        if rng.random() < 0.5:
            ds.Rows = ds.Columns = side
        return f"bomb:{side}"
    return "none"


def _element_offsets(body: bytes) -> list[int]:
    """Offsets of top-level elements of an explicit VR little endian data set (best effort)."""
    offsets, pos = [], 0
    while pos + 8 <= len(body):
        offsets.append(pos)
        vr = body[pos + 4 : pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN", b"OD", b"OL", b"UC", b"UR", b"OV", b"SV", b"UV"):
            if pos + 12 > len(body):
                break
            (length,) = struct.unpack("<L", body[pos + 8 : pos + 12])
            if length == 0xFFFFFFFF:
                break  # undefined length: stop here (a sequence or encapsulated pixel data follows)
            pos += 12 + length
        else:
            (length,) = struct.unpack("<H", body[pos + 6 : pos + 8])
            pos += 8 + length
    return offsets


def _mutate_bytes(body: bytes, syntax: str, rng: random.Random) -> tuple[bytes, str]:
    # About half the cases keep a well-formed encoding, so that they reach the worker.
    kind = rng.choice(
        ["length", "vr", "truncate", "flip", "fragments", "none", "none", "none", "none", "none"]
    )
    data = bytearray(body)
    explicit = syntax not in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)
    if kind == "length" and explicit:
        offsets = _element_offsets(body)
        if offsets:
            at = rng.choice(offsets)
            vr = bytes(data[at + 4 : at + 6])
            if vr in (b"OB", b"OW", b"SQ", b"UT", b"UN"):
                value = rng.choice([0, 1, 3, 0xFFFFFFFE, 0xFFFFFFFF, 0x7FFFFFFF, len(body)])
                data[at + 8 : at + 12] = struct.pack("<L", value)
            else:
                data[at + 6 : at + 8] = struct.pack("<H", rng.choice([0, 1, 3, 0xFFFF, 255]))
            return bytes(data), "length"
    if kind == "vr" and explicit:
        offsets = _element_offsets(body)
        if offsets:
            at = rng.choice(offsets)
            data[at + 4 : at + 6] = rng.choice([b"SQ", b"OB", b"US", b"UL", b"XX", b"\x00\x00", b"UN", b"FD"])
            return bytes(data), "vr"
    if kind == "truncate" and len(body) > 16:
        return bytes(data[: rng.randrange(1, len(body))]), "truncate"
    if kind == "flip":
        for _ in range(rng.randint(1, 16)):
            at = rng.randrange(min(len(data), 4096))
            data[at] ^= 1 << rng.randrange(8)
        return bytes(data), "flip"
    if kind == "fragments" and syntax in ENCAPSULATED:
        at = body.rfind(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff")
        if at >= 0:
            items = at + 12
            what = rng.choice(["offset-table", "fragment-length", "no-delimiter", "empty-fragments", "odd"])
            if what == "offset-table":
                data[items + 4 : items + 8] = struct.pack("<L", rng.choice([4, 8, 0xFFFFFFFF, 3]))
            elif what == "fragment-length":
                (bot,) = struct.unpack("<L", data[items + 4 : items + 8])
                first = items + 8 + bot
                if first + 8 <= len(data):
                    data[first + 4 : first + 8] = struct.pack(
                        "<L", rng.choice([0, 1, 2, 0xFFFFFFFF, len(body)])
                    )
            elif what == "no-delimiter":
                data = data[:-8]
            elif what == "empty-fragments":
                data[-8:-8] = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" * rng.randint(1, 50)
            else:
                data[-8:-8] = b"\xfe\xff\x00\xe0\x03\x00\x00\x00abc"
            return bytes(data), f"fragments:{what}"
    return body, "none"


def dataset_cases(seed: int, count: int) -> list[DatasetCase]:
    rng = random.Random(seed)
    cases: list[DatasetCase] = []
    while len(cases) < count:
        ds, syntax = _base(rng)
        sop_class, sop_instance = (
            str(ds.get("SOPClassUID", "1.2.840.10008.5.1.4.1.1.7")),
            str(ds.SOPInstanceUID),
        )
        names = [_mutate_dataset(ds, rng)]
        syntax = str(ds.file_meta.TransferSyntaxUID)
        try:
            body = _encode(ds, syntax)
        except Exception:  # a mutation pydicom cannot even write: try another
            continue
        body, name = _mutate_bytes(body, syntax, rng)
        names.append(name)
        sent_as = syntax
        if rng.random() < 0.06:  # sent under another transfer syntax than it is encoded in
            sent_as = rng.choice([s for s in SYNTAXES if s != syntax])
            names.append(f"sent-as:{sent_as}")
        if rng.random() < 0.03:
            body = rng.randbytes(rng.randint(1, 4096))
            names = ["garbage"]
        cases.append(
            DatasetCase(
                "+".join(n for n in names if n != "none") or "plain", sop_class, sop_instance, sent_as, body
            )
        )
    return cases


# ---------------------------------------------------------------------------------------------- PDU cases


def _valid_exchanges(rng: random.Random) -> list[bytes]:
    store_body = _encode(_synthetic(ExplicitVRLittleEndian, rng.randrange(300)), ExplicitVRLittleEndian)[
        :6000
    ]
    store = [
        P.c_store_rq(generate_uid()),
        P.p_data(P.pdv(1, 0x00, store_body[:3000])),
        P.p_data(P.pdv(1, 0x02, store_body[3000:])),
    ]
    return [P.associate_rq(), P.c_echo_rq(), *(store if rng.random() < 0.5 else []), P.release_rq()]


def _mutate_associate(rq: bytes, rng: random.Random) -> bytes:
    data = bytearray(rq)
    what = rng.choice(["item-type", "item-length", "version", "called", "max-pdu", "cut-item"])
    items = 6 + 68
    if what == "item-type":
        data[items] = rng.choice([0x00, 0x11, 0x20, 0x21, 0x50, 0xFF])
    elif what == "item-length":
        pos = rng.randrange(items, len(data) - 4)
        data[pos + 2 : pos + 4] = struct.pack(">H", rng.choice([0, 1, 0xFFFF, 300]))
    elif what == "version":
        data[6:8] = struct.pack(">H", rng.choice([0, 2, 0xFFFF]))
    elif what == "called":
        data[10:26] = rng.choice([b" " * 16, b"\x00" * 16, b"WRONG_AE".ljust(16)])
    elif what == "max-pdu":
        at = bytes(data).find(b"\x51\x00\x00\x04")
        if at >= 0:
            data[at + 4 : at + 8] = struct.pack(">L", rng.choice([0, 1, 0xFFFFFFFF]))
    else:
        cut = rng.randrange(items, len(data))
        data = data[:cut]
        data[2:6] = struct.pack(">L", len(data) - 6)
    return bytes(data)


def _mutate_pdu(raw: bytes, rng: random.Random) -> bytes:
    data = bytearray(raw)
    what = rng.choice(["type", "length", "pdv-length", "context", "control", "cut", "flip", "huge"])
    if what == "type":
        data[0] = rng.choice([0x00, 0x08, 0x09, 0x41, 0xFF, 0x01, 0x02, 0x03, 0x06])
    elif what == "length":
        data[2:6] = struct.pack(">L", max(0, len(data) - 6 + rng.choice([-3, -1, 1, 7, 1000])))
    elif what == "huge":
        data[2:6] = struct.pack(">L", rng.choice([1 << 21, 1 << 30, 0xFFFFFFFF]))
    elif what == "pdv-length" and data[0] == P.P_DATA_TF and len(data) >= 12:
        data[6:10] = struct.pack(">L", rng.choice([0, 1, 2, 0xFFFFFFFF, len(data)]))
    elif what == "context" and data[0] == P.P_DATA_TF and len(data) >= 12:
        data[10] = rng.choice([0, 2, 5, 255])
    elif what == "control" and data[0] == P.P_DATA_TF and len(data) >= 12:
        data[11] = rng.choice([0x00, 0x01, 0x02, 0xFC, 0xFF])
    elif what == "cut":
        data = data[: rng.randrange(1, len(data))]
    else:
        for _ in range(rng.randint(1, 8)):
            at = rng.randrange(len(data))
            data[at] ^= 1 << rng.randrange(8)
    return bytes(data)


def pdu_cases(seed: int, count: int) -> list[PduCase]:
    rng = random.Random(seed)
    cases: list[PduCase] = []
    for n in range(count):
        steps = _valid_exchanges(rng)
        what = rng.choice(["associate", "pdu", "pdu", "drop", "repeat", "splice", "abort"])
        if what == "associate":
            steps[0] = _mutate_associate(steps[0], rng)
        elif what == "pdu":
            at = rng.randrange(len(steps))
            steps[at] = _mutate_pdu(steps[at], rng)
        elif what == "drop":
            del steps[rng.randrange(len(steps))]
        elif what == "repeat":
            at = rng.randrange(len(steps))
            steps.insert(at, steps[at])
        elif what == "splice":
            at = rng.randrange(len(steps))
            steps.insert(at, rng.randbytes(rng.randint(1, 64)))
        else:
            steps.insert(rng.randrange(1, len(steps) + 1), P.abort())
        cases.append(PduCase(f"{n}:{what}", tuple(steps)))
    return cases
