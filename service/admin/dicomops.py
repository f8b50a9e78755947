"""DICOM from the dashboard: C-ECHO to peers, uploads C-STOREd to our own listener, heatmaps and source
images as PNG.

An upload goes through the listener like any PACS-sent study (same spool, gate, job, outputs), so the
dashboard never writes studies into the database itself.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import (
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from service.core.settings import Settings
from service.core.tls import client_context

UPLOAD_MARK = "Uploaded via cxr-gateway dashboard"
MAX_UPLOAD_PIXELS = 50_000_000  # a chest film is ~10 MP; more is a mistake or a decompression bomb
PNG_MAX_SIDE = 1600
SOURCE_MAX_SIDE = 512  # the job page's thumbnail of an analysed image
_STRETCH_PERCENTILES = (0.5, 99.5)


class SourceImageError(ValueError):
    """The spooled source image cannot be rendered (unreadable file, pixel data we cannot decode)."""


class UploadError(ValueError):
    """The file is not something we can send (not DICOM, not an image, no pixel data …)."""


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str
    elapsed_ms: int


@dataclass(frozen=True)
class Peer:
    ae_title: str
    host: str
    port: int
    tls: bool = False


def listener_peer(settings: Settings) -> Peer:
    """Our own listener as the dashboard reaches it (loopback when it binds every address)."""
    host = settings.listener_host
    # Recognises a wildcard bind, binds nothing (bandit B104).
    if host in {"", "0.0.0.0", "::"}:  # nosec B104
        host = "127.0.0.1"
    if settings.listener_plaintext or settings.listener_tls_port is None:
        return Peer(settings.listener_ae_title, host, settings.listener_port)
    return Peer(settings.listener_ae_title, host, settings.listener_tls_port, tls=True)


def _ae(settings: Settings, timeout: float) -> AE:
    ae = AE(ae_title=settings.dashboard_ae_title)
    ae.acse_timeout = timeout
    ae.dimse_timeout = timeout
    ae.network_timeout = timeout
    return ae


def _associate(ae: AE, peer: Peer, settings: Settings) -> Any:
    tls_args = (client_context(settings), peer.host) if peer.tls else None
    return ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args)


def echo(settings: Settings, peer: Peer, timeout: float = 5.0) -> EchoResult:
    """One C-ECHO; the detail says what went wrong in words an admin can act on."""
    ae = _ae(settings, timeout)
    ae.add_requested_context(Verification)
    started = time.monotonic()
    try:
        assoc = _associate(ae, peer, settings)
    except Exception as exc:  # TLS set-up and socket errors: the peer is unreachable from here
        return EchoResult(False, f"could not connect: {type(exc).__name__}", _ms(started))
    if assoc.is_rejected:
        return EchoResult(False, "association rejected (AE title or address not accepted)", _ms(started))
    if not assoc.is_established:
        return EchoResult(False, "no association (peer unreachable or not DICOM)", _ms(started))
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    if status and status.get("Status") == 0x0000:
        return EchoResult(True, "C-ECHO succeeded", _ms(started))
    code = f"0x{int(status.Status):04X}" if status and "Status" in status else "no response"
    return EchoResult(False, f"C-ECHO failed: {code}", _ms(started))


def _ms(started: float) -> int:
    return round((time.monotonic() - started) * 1000)


def store_to_listener(settings: Settings, ds: Dataset, timeout: float = 30.0) -> None:
    """C-STORE one dataset to our listener; raises UploadError with the reason when it is not stored."""
    peer = listener_peer(settings)
    ae = _ae(settings, timeout)
    syntax = str(ds.file_meta.TransferSyntaxUID)
    ae.add_requested_context(str(ds.SOPClassUID), list(dict.fromkeys([syntax, ExplicitVRLittleEndian])))
    try:
        assoc = _associate(ae, peer, settings)
    except Exception as exc:
        raise UploadError(f"could not reach the listener: {type(exc).__name__}") from exc
    if not assoc.is_established:
        raise UploadError(
            "the listener refused the association: is the dashboard's AE title "
            f"{settings.dashboard_ae_title} allowed in CXR_SOURCES?"
        )
    try:
        status = assoc.send_c_store(ds)
    finally:
        assoc.release()
    code = int(status.Status) if status and "Status" in status else None
    if code != 0x0000:
        raise UploadError(f"the listener did not store it (status {'none' if code is None else hex(code)})")


def read_upload(data: bytes, filename: str, settings: Settings, *, fresh_uids: bool = True) -> Dataset:
    """A DICOM file as it is (optionally under new UIDs), or a PNG/JPEG wrapped as a Secondary Capture."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        try:
            ds = dcmread(io.BytesIO(data))
        except (InvalidDicomError, ValueError, EOFError) as exc:
            raise UploadError(f"unreadable DICOM file: {type(exc).__name__}") from exc
        for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not ds.get(keyword):
                raise UploadError(f"the DICOM file has no {keyword}")
        if "PixelData" not in ds:
            raise UploadError("the DICOM file has no pixel data")
        if fresh_uids:
            _fresh_uids(ds, settings)
        return ds
    try:
        return wrap_image(data, settings)
    except UploadError:
        raise
    except (UnidentifiedImageError, OSError) as exc:
        raise UploadError(f"{filename or 'the file'} is neither DICOM nor a PNG/JPEG image") from exc


def _fresh_uids(ds: Dataset, settings: Settings) -> None:
    prefix = settings.uid_prefix
    ds.StudyInstanceUID = generate_uid(prefix=prefix)
    ds.SeriesInstanceUID = generate_uid(prefix=prefix)
    ds.SOPInstanceUID = generate_uid(prefix=prefix)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def wrap_image(data: bytes, settings: Settings) -> Dataset:
    """A PNG/JPEG chest image as an 8-bit greyscale Secondary Capture in a new study, marked uploaded."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format not in {"PNG", "JPEG"}:
            raise UploadError(f"only PNG and JPEG images can be uploaded, not {img.format}")
        if img.width * img.height > MAX_UPLOAD_PIXELS:
            raise UploadError("the image is too large")
        grey = np.asarray(img.convert("L"), dtype=np.uint8)
    now = datetime.now(UTC)
    prefix = settings.uid_prefix
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(prefix=prefix)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid(prefix=prefix)
    ds.SeriesInstanceUID = generate_uid(prefix=prefix)
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.PatientName = ""
    ds.PatientID = ""
    ds.PatientBirthDate = ""
    ds.PatientSex = ""
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "UPLOAD"
    ds.StudyDescription = UPLOAD_MARK
    ds.SeriesDescription = UPLOAD_MARK
    ds.ImageComments = f"{UPLOAD_MARK}; not from a modality or PACS"
    ds.Modality = "OT"
    ds.ConversionType = "WSD"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = grey.shape
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = grey.tobytes()
    return ds


def heatmap_png(path: Path, max_side: int = PNG_MAX_SIDE) -> bytes:
    """The heatmap Secondary Capture's pixels as a PNG (downscaled to ``max_side``)."""
    ds = dcmread(path)
    pixels = ds.pixel_array
    if pixels.dtype != np.uint8:
        pixels = _to_uint8(pixels)
    img = Image.fromarray(pixels)  # (rows, columns, 3) is RGB, (rows, columns) greyscale
    img.thumbnail((max_side, max_side))
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)
    return out.getvalue()


def thumbnail_size(rows: int, columns: int, max_side: int = SOURCE_MAX_SIDE) -> tuple[int, int]:
    """(width, height) of a source image's thumbnail: the aspect kept, the long side at most max_side."""
    scale = min(1.0, max_side / max(rows, columns, 1))
    return max(1, round(columns * scale)), max(1, round(rows * scale))


def source_png(path: Path, max_side: int = SOURCE_MAX_SIDE, *, invert: bool = False) -> bytes:
    """A downscaled greyscale PNG of a source X-ray, bone bright.

    Modality LUT, then the image's own window (or a percentile stretch without one), then MONOCHROME1
    inverted; ``invert`` flips it once more (the worker's heuristic found the image stored inverted).
    The first frame of a multi-frame image; colour images are shown as they are, in grey.
    """
    try:
        ds = dcmread(path)
        stored = np.asarray(ds.pixel_array)
        samples = int(ds.get("SamplesPerPixel") or 1)
        frames = int(ds.get("NumberOfFrames") or 1)
        if frames > 1:
            stored = stored[0]
        if samples > 1:
            grey = np.asarray(Image.fromarray(_to_uint8(stored)).convert("L"), dtype=np.float64)
        else:
            grey = _display(np.asarray(apply_modality_lut(stored, ds), dtype=np.float64), ds)
    except SourceImageError:
        raise
    except Exception as exc:  # codecs and malformed pixel modules raise many types; all mean "cannot show"
        raise SourceImageError(f"cannot render the source image: {type(exc).__name__}") from exc
    if grey.ndim != 2 or grey.size == 0:
        raise SourceImageError(f"unexpected pixel array shape {grey.shape}")
    if samples == 1 and str(ds.get("PhotometricInterpretation", "")).strip() == "MONOCHROME1":
        grey = 255.0 - grey
    if invert:
        grey = 255.0 - grey
    img = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L")
    size = thumbnail_size(img.height, img.width, max_side)
    if size != img.size:
        img = img.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    out = io.BytesIO()
    img.save(out, format="PNG", optimize=False)
    return out.getvalue()


def _display(values: Any, ds: Dataset) -> Any:
    """Modality values mapped to 0..255 by the first window of the image, else a percentile stretch."""
    if ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None:
        windowed = np.asarray(apply_voi_lut(values, ds, index=0, prefer_lut=False), dtype=np.float64)
        # pydicom maps the window onto the stored-value range; ±inf gives that range's ends.
        ends = np.asarray(apply_voi_lut(np.array([-np.inf, np.inf]), ds, index=0, prefer_lut=False))
        lo, hi = float(ends[0]), float(ends[1])
    else:
        windowed = values
        lo, hi = (float(v) for v in np.percentile(values, _STRETCH_PERCENTILES))
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return np.zeros_like(values)
    return np.clip((windowed - lo) / (hi - lo), 0.0, 1.0) * 255.0


def _to_uint8(pixels: Any) -> Any:
    arr = np.asarray(pixels, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    scaled = (arr - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(arr)
    return scaled.astype(np.uint8)


__all__ = [
    "UPLOAD_MARK",
    "EchoResult",
    "Peer",
    "SourceImageError",
    "UploadError",
    "echo",
    "heatmap_png",
    "listener_peer",
    "read_upload",
    "source_png",
    "store_to_listener",
    "thumbnail_size",
    "wrap_image",
]
