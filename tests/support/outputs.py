"""The algorithm and the output identities the DICOM builder tests share (tests/unit/dicom)."""

from __future__ import annotations

from pathlib import Path

import pydicom

from service.core.status import OutputKind
from worker.dicom.sr import AlgorithmInfo, OutputContext
from worker.dicom.uids import derive_uid
from worker.outputs import SERIES_NUMBERS

PREFIX = "1.2.826.0.1.3680043.10.1453."
ALGORITHM = AlgorithmInfo(
    name="cxr-densenet121",
    version="1.2.0",
    bundle_hash="sha256:0f1e2d3c4b5a69788796a5b4c3d2e1f0",
    software_version="cxr-gateway 0.1.0",
    device_uid="1.2.826.0.1.3680043.10.1453.99.1",
)


def context(source: pydicom.Dataset, kind: OutputKind, algorithm: AlgorithmInfo = ALGORITHM) -> OutputContext:
    """The context worker.outputs gives a ``kind`` object of ``source``: UIDs derived as it derives them
    (series from the study, object from the source instance), the kind's series number."""
    version = algorithm.version
    return OutputContext(
        algorithm=algorithm,
        series_instance_uid=derive_uid(PREFIX, str(source.StudyInstanceUID), version, f"{kind}-series"),
        sop_instance_uid=derive_uid(PREFIX, str(source.get("SOPInstanceUID")), version, str(kind)),
        series_number=SERIES_NUMBERS[kind],
    )


def save(ds: pydicom.Dataset, path: Path) -> Path:
    """``ds`` written as a Part 10 file at ``path`` (for dciodvfy and DCMTK)."""
    ds.save_as(path, enforce_file_format=True)
    return path
