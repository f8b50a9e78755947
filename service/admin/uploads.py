"""Dashboard uploads: a DICOM file or a PNG/JPEG chest image, C-STOREd to our own listener.

An upload goes through the listener like any PACS-sent study (same spool, gate, job, outputs), so the
dashboard never writes studies into the database itself.
"""

from __future__ import annotations

import io
from datetime import UTC, datetime

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydicom import Dataset, dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from service.core.settings import Settings
from service.core.tls import client_context
from service.dicomnet import scu

UPLOAD_MARK = "Uploaded via cxr-gateway dashboard"
MAX_UPLOAD_PIXELS = 50_000_000  # a chest film is ~10 MP; more is a mistake or a decompression bomb


class UploadError(ValueError):
    """The file is not something we can send (not DICOM, not an image, no pixel data …)."""


def store_to_listener(settings: Settings, ds: Dataset, timeout: float = 30.0) -> None:
    """C-STORE one dataset to our listener; raises UploadError with the reason when it is not stored."""
    try:
        code = scu.store(
            ds,
            scu.listener_peer(settings),
            calling_ae_title=settings.dashboard_ae_title,
            timeout=timeout,
            tls=lambda: client_context(settings),
        )
    except scu.NoAssociation as exc:
        if exc.error is not None:
            raise UploadError(f"could not reach the listener: {exc.error}") from exc
        raise UploadError(
            "the listener refused the association: is the dashboard's AE title "
            f"{settings.dashboard_ae_title} allowed in CXR_SOURCES?"
        ) from exc
    if code != scu.SUCCESS:
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
