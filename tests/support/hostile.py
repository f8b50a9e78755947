"""Hostile inputs built from real data: decompression bombs, broken rescales, datasets to mutate."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import numpy.typing as npt
import openjpeg
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from tests.support.paths import NIH_DEV_IMAGES

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
__all__ = ["CR_STORAGE", "CTImageStorage", "chest_cr", "j2k_bomb", "nih_pixels"]


def nih_pixels(index: int = 0, side: int | None = None) -> npt.NDArray[np.uint16]:
    """A real NIH chest X-ray (512 px, 8-bit) as 12-bit stored values, optionally resized."""
    names = sorted(NIH_DEV_IMAGES.glob("*.png"))
    image = Image.open(names[index % len(names)]).convert("L")
    if side is not None:
        image = image.resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(image, dtype=np.uint16) * 16


def chest_cr(pixels: npt.NDArray[np.uint16] | None = None, *, study_uid: str | None = None) -> Dataset:
    """A complete CR chest PA dataset (Explicit VR LE) around real pixels, under fresh UIDs."""
    pixels = nih_pixels() if pixels is None else pixels
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "HOSTILE^TEST"
    ds.PatientID = "HOSTILE1"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.StudyID = "1"
    ds.ReferringPhysicianName = ""
    ds.Modality = "CR"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.PatientOrientation = ["L", "F"]
    ds.Manufacturer = "cxr-gateway tests"
    ds.Rows, ds.Columns = (int(v) for v in pixels.shape)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype="<u2").tobytes()
    return ds


def j2k_bomb(rows: int, columns: int) -> bytes:
    """A JPEG 2000 codestream of a few hundred bytes whose SIZ marker declares ``rows`` x ``columns``
    (one tile): a decoder that trusts it reserves rows x columns x 4 bytes before it finds the data
    missing."""
    stream = bytearray(
        openjpeg.encode(np.zeros((64, 64), np.uint16) + 7, codec_format=0, bits_stored=12)  # type: ignore[attr-defined]
    )
    # SIZ (ISO 15444-1 A.5.1): Xsiz, Ysiz at 8, XTsiz, YTsiz at 24 (after SOC, marker, Lsiz, Rsiz).
    stream[8:16] = struct.pack(">2L", columns, rows)
    stream[24:32] = struct.pack(">2L", columns, rows)
    return bytes(stream)


def with_bomb(ds: Dataset, rows: int, columns: int, *, header: tuple[int, int] | None = None) -> Dataset:
    """``ds`` with its Pixel Data replaced by a JPEG 2000 bomb declaring ``rows`` x ``columns``; the header
    says ``header`` (default: the same size)."""
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.PixelData = encapsulate([j2k_bomb(rows, columns)])
    ds["PixelData"].is_undefined_length = True
    ds["PixelData"].VR = "OB"
    ds.Rows, ds.Columns = header or (rows, columns)
    return ds


def save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path
