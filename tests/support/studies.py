"""Copies of shared DICOM files under fresh UIDs: several encodings of one image become distinct studies."""

from __future__ import annotations

import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import generate_uid

from service.core.models import Instance, Job, Study
from service.core.status import JobStatus
from service.scp import spool


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


def enqueue_files(rt: Any, files: list[Path]) -> str:
    """Spool ``files`` as one study for a worker ``Runtime`` (as the listener would) and queue its job.

    A file's own SOP class and transfer syntax are recorded where it has them, else the first file's
    (hostile inputs may lack them); the spool path always uses the first file's study.
    """
    first = dcmread(files[0], stop_before_pixels=True)
    with rt.sessions.begin() as s:
        study = Study(study_instance_uid=str(first.StudyInstanceUID))
        s.add(study)
        s.flush()
        for path in files:
            ds = dcmread(path, stop_before_pixels=True)
            uid = str(ds.SOPInstanceUID)
            rel = spool.relative_path(str(first.StudyInstanceUID), uid)
            (rt.settings.spool_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, rt.settings.spool_dir / rel)
            syntax = (getattr(ds, "file_meta", None) or first.file_meta).get("TransferSyntaxUID")
            s.add(
                Instance(
                    study_id=study.id,
                    sop_instance_uid=uid,
                    sop_class_uid=str(ds.get("SOPClassUID") or first.SOPClassUID),
                    transfer_syntax_uid=str(syntax or first.file_meta.TransferSyntaxUID),
                    spool_path=str(rel),
                    size_bytes=path.stat().st_size,
                    sha256="x",
                    calling_ae_title="TEST",
                )
            )
        job = Job(study_id=study.id, status=JobStatus.QUEUED, queued_at=datetime.now(UTC))
        s.add(job)
        s.flush()
        return str(job.id)
