"""The signed JSON webhook (pure functions): body, HMAC-SHA256 signature headers, and their check.

The signature covers ``<timestamp>.<body>`` (the timestamp header and the exact body bytes), so a
receiver that refuses old timestamps also refuses a replayed request. The body carries no patient name
or id: the accession number and Study Instance UID are what an on-call system needs to find the study.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.notify import codes
from service.notify.message import Urgent

SIGNATURE_HEADER = "X-CXR-Signature"
TIMESTAMP_HEADER = "X-CXR-Timestamp"
ID_HEADER = "X-CXR-Notification-Id"


def build_body(msg: Urgent, now: datetime) -> bytes:
    payload: dict[str, Any] = {
        "id": msg.control_id,
        "event": "urgent_finding",
        "revision": msg.revision,
        "corrected": msg.corrected,
        "priority": msg.priority.value,
        "rule": msg.rule,
        "job_id": msg.job_id,
        "accession_number": msg.accession_number,
        "study_instance_uid": msg.study_instance_uid,
        "finding": {
            "label": msg.label,
            "code": {"system": codes.finding(msg.label).fhir_system, "code": codes.finding(msg.label).code},
            "score": round(msg.score, 4),
            "score_kind": msg.score_kind,
            "min_score": msg.min_score,
            "sop_instance_uid": msg.sop_instance_uid,
        },
        "bundle": {"name": msg.bundle_name, "version": msg.bundle_version},
        "observed_at": msg.observed_at.astimezone(UTC).isoformat(timespec="seconds"),
        "sent_at": now.astimezone(UTC).isoformat(timespec="seconds"),
        "disclaimer": codes.DISCLAIMER,
    }
    return json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()


def read_secret(path: Path) -> bytes:
    """The shared secret from its file (surrounding whitespace dropped); read at each send, so a rotated
    secret takes effect without a restart."""
    secret = path.read_bytes().strip()
    if not secret:
        raise ValueError("webhook secret file is empty")
    return secret


def signature(secret: bytes, timestamp: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256).hexdigest()


def signed_headers(secret: bytes, body: bytes, msg: Urgent, now: datetime) -> dict[str, str]:
    timestamp = str(int(now.timestamp()))
    return {
        "Content-Type": "application/json",
        TIMESTAMP_HEADER: timestamp,
        SIGNATURE_HEADER: signature(secret, timestamp, body),
        ID_HEADER: msg.control_id,
    }


def verify(
    secret: bytes, timestamp: str, body: bytes, given: str, now: datetime, tolerance: int = 300
) -> bool:
    """A receiver's check (also what docs/integration.md shows): the signature, in constant time, and a
    timestamp within ``tolerance`` seconds."""
    try:
        age = abs(now.timestamp() - int(timestamp))
    except ValueError:
        return False
    return age <= tolerance and hmac.compare_digest(signature(secret, timestamp, body), given)
