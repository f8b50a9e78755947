"""Which of a study's received instances are analysed: each is read (header only), gated (size, header)
and decoded, and an instance that fails any step is left out with a coded reason, never the study."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import Dataset, dcmread

from service.core.status import ReasonCode
from worker.dicom.decoder import DecodeTimeout
from worker.dicom.gate import check_header, check_size
from worker.dicom.pixels import DisplayImage, PixelDataError
from worker.dicom.source import SourceHeaderError, source_header
from worker.runtime import Runtime

log = logging.getLogger(__name__)

# Header values above this size are read from the spool file only when something asks for them.
_DEFER_BYTES = 64 * 1024


@dataclass
class Admission:
    """``gate``: every instance's reason for being left out (None: analysed); ``received``: the headers an
    output may reference; ``eligible``: the analysed ones with their decoded pixels."""

    gate: dict[str, str | None] = field(default_factory=dict)
    received: list[Dataset] = field(default_factory=list)
    eligible: list[tuple[Dataset, DisplayImage]] = field(default_factory=list)

    @property
    def reasons(self) -> dict[str, str]:
        return {uid: str(reason) for uid, reason in self.gate.items() if reason}


def admit(rows: list[tuple[str, Path]], job_id: str, rt: Runtime) -> Admission:
    """``rows``: each instance's SOP Instance UID and spool file, in the order they were received."""
    admission = Admission()
    for sop_uid, path in rows:
        admission.gate[sop_uid] = _admit_one(path, job_id, rt, admission)
    return admission


def _admit_one(path: Path, job_id: str, rt: Runtime, admission: Admission) -> str | None:
    if not path.is_file():
        return ReasonCode.SPOOL_FILE_MISSING
    try:
        # Large values (the pixel data) stay on disk: the decoder child reads them, not this process.
        ds = dcmread(path, defer_size=_DEFER_BYTES)
        decision = check_size(ds, path.stat().st_size, rt.size_limits)
        if decision.eligible:
            decision = check_header(ds, rt.gate_rules)
    except Exception as exc:  # a header pydicom cannot read costs this instance, not the study
        log.warning(
            "job=%s instance unreadable reason=%s error=%s",
            job_id,
            ReasonCode.DATASET_MALFORMED,
            type(exc).__name__,
        )
        return ReasonCode.DATASET_MALFORMED
    try:
        source_header(ds)  # an instance no output may reference is left out of every output
    except SourceHeaderError as exc:
        return exc.reason
    admission.received.append(ds)
    if not decision.eligible:
        return decision.reason
    try:
        display = rt.decoder.decode(path)
    except PixelDataError as exc:
        return exc.reason
    except DecodeTimeout:
        return ReasonCode.PIXEL_DECODE_TIMEOUT
    admission.eligible.append((ds, display))
    return None
