"""Copies of shared DICOM files under fresh UIDs: several encodings of one image become distinct studies."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid


def with_fresh_uids(source: Path, target: Path, *, study_uid: str | None = None) -> Path:
    """Write ``source`` to ``target`` with new study (unless given), series and SOP instance UIDs.

    Pixel data is carried as it is (compressed stays compressed): only header values change.
    """
    ds = dcmread(source)
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    target.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(target, enforce_file_format=True)
    return target
