"""What a STOW-RS exchange says, for both ends (PS3.18 10.5, PS3.4 B.2.3): the multipart/related body of
DICOM parts, the DICOM JSON response's sequences, and which failure reasons may pass with a retry."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

DICOM = "application/dicom"
DICOM_JSON = "application/dicom+json"

# DICOM JSON keys (group+element, upper-case hex)
RETRIEVE_URL = "00081190"
FAILED_SOP_SEQUENCE = "00081198"
REFERENCED_SOP_SEQUENCE = "00081199"
REFERENCED_SOP_CLASS_UID = "00081150"
REFERENCED_SOP_INSTANCE_UID = "00081155"
FAILURE_REASON = "00081197"
WARNING_REASON = "00081196"


class FailureReason(IntEnum):
    """Failure Reason (0008,1197) values this gateway sends and classifies."""

    PROCESSING_FAILURE = 0x0110
    NOT_AUTHORIZED = 0x0124
    RESOURCE_LIMITATION = 0x0213
    OUT_OF_RESOURCES = 0xA700
    SOP_CLASS_MISMATCH = 0xA900  # also: the instance is not of the study the request named
    CANNOT_UNDERSTAND = 0xC000


def is_transient(reason: int) -> bool:
    """A failure the same instance may get past later (the archive's resources), not one about the data."""
    return reason in {FailureReason.PROCESSING_FAILURE, FailureReason.RESOURCE_LIMITATION} or (
        reason & 0xFF00 == 0xA700
    )


def new_boundary() -> str:
    return f"cxr-{secrets.token_hex(16)}"


def content_type(boundary: str) -> str:
    return f'multipart/related; type="{DICOM}"; boundary={boundary}'


def multipart_parts(boundary: str, parts: Iterable[bytes]) -> Iterator[bytes]:
    """The body of a multipart/related request of DICOM parts (RFC 2387), chunk by chunk."""
    for part in parts:
        yield f"--{boundary}\r\nContent-Type: {DICOM}\r\n\r\n".encode()
        yield part
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


@dataclass
class StoreReport:
    """Per-instance answer of a STOW-RS server: stored (with an optional warning) or failed (a reason)."""

    stored: dict[str, int | None] = field(default_factory=dict)  # SOP Instance UID -> warning reason
    failed: dict[str, int] = field(default_factory=dict)  # SOP Instance UID -> failure reason
    # Failed parts whose SOP Instance UID could not be read (garbage, a part cut short): their reasons.
    unnamed: list[int] = field(default_factory=list)

    @classmethod
    def from_json(cls, body: Any) -> StoreReport:
        """Read a DICOM JSON response; anything unexpected in it reads as "nothing reported"."""
        report = cls()
        if isinstance(body, list):  # some servers wrap the one data set in an array
            body = body[0] if body else {}
        if not isinstance(body, dict):
            return report
        for item in _items(body, REFERENCED_SOP_SEQUENCE):
            uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
            if isinstance(uid, str):
                warning = _first(item, WARNING_REASON)
                report.stored[uid] = int(warning) if isinstance(warning, int) else None
        for item in _items(body, FAILED_SOP_SEQUENCE):
            uid = _first(item, REFERENCED_SOP_INSTANCE_UID)
            value = _first(item, FAILURE_REASON)
            reason = int(value) if isinstance(value, int) else int(FailureReason.CANNOT_UNDERSTAND)
            if isinstance(uid, str) and uid:
                report.failed[uid] = reason
            else:
                report.unnamed.append(reason)
        return report


def _items(body: dict[str, Any], tag: str) -> list[dict[str, Any]]:
    value = body.get(tag, {}).get("Value", []) if isinstance(body.get(tag), dict) else []
    return [item for item in value if isinstance(item, dict)]


def _first(item: dict[str, Any], tag: str) -> object:
    element = item.get(tag)
    values = element.get("Value") if isinstance(element, dict) else None
    return values[0] if isinstance(values, list) and values else None


def sop_item(
    sop_class: str, sop_instance: str, *, failure: int | None = None, url: str | None = None
) -> dict[str, Any]:
    """One item of the Referenced (or, with ``failure``, Failed) SOP Sequence in DICOM JSON."""
    item: dict[str, Any] = {
        REFERENCED_SOP_CLASS_UID: {"vr": "UI", "Value": [sop_class]} if sop_class else {"vr": "UI"},
        REFERENCED_SOP_INSTANCE_UID: {"vr": "UI", "Value": [sop_instance]} if sop_instance else {"vr": "UI"},
    }
    if failure is not None:
        item[FAILURE_REASON] = {"vr": "US", "Value": [int(failure)]}
    if url is not None:
        item[RETRIEVE_URL] = {"vr": "UR", "Value": [url]}
    return item
