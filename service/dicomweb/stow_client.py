"""Sending result objects to a DICOMweb destination by STOW-RS, and what its answer means for a delivery.

200: every instance stored. 202: some failed, each with a Failure Reason in the FailedSOPSequence (0xA7xx
and processing failures may pass: retry; the rest are about the data: dead letter). 409 and 400: refused
(dead). 401/403: our credentials are wrong (dead, "not authorised": an admin fixes them and replays).
5xx, 408, 429 and no answer: retry. Nothing here logs (an archive's error text may echo patient data).
"""

from __future__ import annotations

import base64
import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from service.core.errors import PermanentError, TransientError
from service.core.status import ReasonCode
from service.dicomweb.config import DicomwebDestination
from service.dicomweb.stow import (
    DICOM_JSON,
    StoreReport,
    content_type,
    is_transient,
    multipart_parts,
    new_boundary,
)

_MAX_REPLY = 4 << 20
_RETRY_STATUSES = {408, 425, 429}


@dataclass(frozen=True)
class Reply:
    status: int  # 0: no answer
    report: StoreReport
    error: str = ""  # the exception's type when there was no answer


def auth_header(dest: DicomwebDestination) -> dict[str, str]:
    """The Authorization header, secrets read from their files now; raises TransientError when a file
    cannot be read (a secret being rotated or a mount not there yet)."""
    auth = dest.auth
    if auth is None:
        return {}
    try:
        if auth.type == "basic":
            assert auth.password_file is not None  # checked by the settings
            password = auth.password_file.read_text().strip()
            pair = base64.b64encode(f"{auth.username}:{password}".encode()).decode()
            return {"Authorization": f"Basic {pair}"}
        assert auth.token_file is not None
        return {"Authorization": f"Bearer {auth.token_file.read_text().strip()}"}
    except OSError as exc:
        raise TransientError(
            ReasonCode.DELIVERY_UNREACHABLE, f"credentials unreadable ({type(exc).__name__})"
        ) from exc


def post_instances(dest: DicomwebDestination, files: list[bytes]) -> Reply:
    """One STOW-RS request with these Part 10 files; the server's status and per-instance report."""
    boundary = new_boundary()
    body = b"".join(multipart_parts(boundary, files))
    headers = {"Content-Type": content_type(boundary), "Accept": DICOM_JSON, **auth_header(dest)}
    request = urllib.request.Request(f"{dest.url}/studies", data=body, headers=headers, method="POST")
    try:
        # The URL's scheme is http(s), checked by the destination's settings (bandit B310).
        with urllib.request.urlopen(request, timeout=dest.timeout_seconds) as response:  # nosec B310
            return Reply(response.status, _report(response.read(_MAX_REPLY)))
    except urllib.error.HTTPError as exc:
        return Reply(exc.code, _report(exc.read(_MAX_REPLY) if exc.fp is not None else b""))
    except (OSError, ValueError) as exc:  # URLError, time-outs, refused connections
        reason = getattr(exc, "reason", None)
        return Reply(0, StoreReport(), type(reason if isinstance(reason, BaseException) else exc).__name__)


def _report(body: bytes) -> StoreReport:
    try:
        return StoreReport.from_json(json.loads(body)) if body else StoreReport()
    except ValueError:
        return StoreReport()


def stow_file(dest: DicomwebDestination, path: Path) -> None:
    """Send one file (a delivery); raises TransientError (retry) or PermanentError (dead letter)."""
    data = path.read_bytes()
    uid = str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
    judge(post_instances(dest, [data]), uid)


def judge(reply: Reply, uid: str) -> None:
    """What the reply means for the instance ``uid``: return when stored, else raise."""
    status = reply.status
    if status == 0:
        raise TransientError(ReasonCode.DELIVERY_UNREACHABLE, f"STOW-RS: no answer ({reply.error})")
    reason = reply.report.failed.get(uid)
    if reason is not None and status in {200, 202, 409}:
        # The server named this instance as failed: its reason decides, whatever the HTTP status.
        error = TransientError if is_transient(reason) else PermanentError
        code = ReasonCode.DELIVERY_UNREACHABLE if is_transient(reason) else ReasonCode.DELIVERY_REFUSED
        raise error(code, f"STOW-RS {status}: failure reason 0x{reason:04X}")
    if status in {200, 202}:
        return
    if status in {401, 403}:
        raise PermanentError(
            ReasonCode.DELIVERY_REFUSED, f"STOW-RS {status}: not authorised (check the destination's auth)"
        )
    if status >= 500 or status in _RETRY_STATUSES:
        raise TransientError(ReasonCode.DELIVERY_UNREACHABLE, f"STOW-RS {status}: archive unavailable")
    raise PermanentError(ReasonCode.DELIVERY_REFUSED, f"STOW-RS {status}: refused")
