"""Sending one built notification on its channel, and what the peer's answer means: sent, retry or dead.

MLLP: one TCP connection per message, a time limit on connecting and on the ACK; HTTP: urllib with a
time limit. Nothing here logs: the caller logs the reason code only (a peer's text may echo patient data).
"""

from __future__ import annotations

import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum

from service.notify import fhir, hl7v2, webhook
from service.notify.config import AnyChannel, FhirChannel, Hl7Channel, WebhookChannel
from service.notify.message import Urgent

_MAX_REPLY = 1 << 20  # an ACK or an HTTP answer larger than this is not read further


class Verdict(StrEnum):
    SENT = "sent"
    RETRY = "retry"
    DEAD = "dead"


@dataclass(frozen=True)
class Outcome:
    verdict: Verdict
    reason: str  # a reason code: logs, metrics, the attempt row
    detail: str = ""  # the peer's own words: the dashboard only


def send(channel: AnyChannel, msg: Urgent, now: datetime) -> Outcome:
    """Build the channel's message for ``msg`` and send it once."""
    if isinstance(channel, Hl7Channel):
        return send_mllp(channel, hl7v2.frame(hl7v2.build_oru(msg, channel, now)), msg.control_id)
    if isinstance(channel, FhirChannel):
        return send_fhir(channel, msg, now)
    return send_webhook(channel, msg, now)


def send_mllp(channel: Hl7Channel, framed: bytes, control_id: str) -> Outcome:
    deadline = time.monotonic() + channel.timeout_seconds
    try:
        with socket.create_connection((channel.host, channel.port), timeout=channel.timeout_seconds) as sock:
            sock.sendall(framed)
            reply = b""
            while hl7v2.END_BLOCK not in reply:
                left = deadline - time.monotonic()
                if left <= 0:
                    return Outcome(Verdict.RETRY, "hl7_no_ack", "no ACK within the time-out")
                sock.settimeout(left)
                chunk = sock.recv(65536)
                if not chunk:
                    return Outcome(Verdict.RETRY, "hl7_closed_without_ack", "connection closed before an ACK")
                reply += chunk
                if len(reply) > _MAX_REPLY:
                    return Outcome(Verdict.RETRY, "hl7_ack_too_large", "")
    except TimeoutError:
        return Outcome(Verdict.RETRY, "hl7_no_ack", "no ACK within the time-out")
    except OSError as exc:
        return Outcome(Verdict.RETRY, "hl7_unreachable", type(exc).__name__)
    start = reply.find(hl7v2.START_BLOCK)
    body = reply[start + 1 if start >= 0 else 0 : reply.find(hl7v2.END_BLOCK)]
    ack = hl7v2.read_ack(body, control_id)
    verdict = {
        hl7v2.AckKind.ACCEPTED: Verdict.SENT,
        hl7v2.AckKind.RETRY: Verdict.RETRY,
        hl7v2.AckKind.REJECTED: Verdict.DEAD,
    }[ack.kind]
    return Outcome(verdict, ack.reason, ack.text)


@dataclass(frozen=True)
class HttpReply:
    status: int  # 0: no answer
    body: bytes
    error: str = ""


def post(url: str, body: bytes, headers: dict[str, str], timeout: float) -> HttpReply:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        # The URL's scheme is http(s), checked by the channel's settings (bandit B310).
        with urllib.request.urlopen(request, timeout=timeout) as response:  # nosec B310
            return HttpReply(response.status, response.read(_MAX_REPLY))
    except urllib.error.HTTPError as exc:
        return HttpReply(exc.code, exc.read(_MAX_REPLY) if exc.fp is not None else b"")
    except (OSError, ValueError) as exc:  # URLError, time-outs, refused connections, a bad URL
        reason = getattr(exc, "reason", None)
        return HttpReply(0, b"", type(reason if isinstance(reason, BaseException) else exc).__name__)


# Worth another try later: the server's momentary state (RFC 9110: 408, 425, 429, 5xx).
_RETRY_STATUSES = {408, 425, 429}


def classify_http(prefix: str, reply: HttpReply, detail: str) -> Outcome:
    if reply.status == 0:
        return Outcome(Verdict.RETRY, f"{prefix}_unreachable", reply.error)
    if 200 <= reply.status < 300:
        return Outcome(Verdict.SENT, f"{prefix}_{reply.status}", "")
    verdict = Verdict.RETRY if reply.status >= 500 or reply.status in _RETRY_STATUSES else Verdict.DEAD
    return Outcome(verdict, f"{prefix}_{reply.status}", detail)


def send_fhir(channel: FhirChannel, msg: Urgent, now: datetime) -> Outcome:
    body = fhir.to_json(fhir.build_bundle(msg, now))
    headers = {"Content-Type": "application/fhir+json", "Accept": "application/fhir+json"}
    if channel.bearer_token_file is not None:
        try:
            token = channel.bearer_token_file.read_text().strip()
        except OSError as exc:
            return Outcome(Verdict.RETRY, "fhir_token_unreadable", type(exc).__name__)
        headers["Authorization"] = f"Bearer {token}"
    # A transaction Bundle is POSTed to the base URL itself (FHIR RESTful API, "transaction").
    reply = post(channel.url.rstrip("/"), body, headers, channel.timeout_seconds)
    return classify_http("fhir", reply, fhir.operation_outcome_text(reply.body) if reply.body else "")


def send_webhook(channel: WebhookChannel, msg: Urgent, now: datetime) -> Outcome:
    try:
        secret = webhook.read_secret(channel.secret_file)
    except (OSError, ValueError) as exc:
        return Outcome(Verdict.RETRY, "webhook_secret_unreadable", type(exc).__name__)
    body = webhook.build_body(msg, now)
    reply = post(channel.url, body, webhook.signed_headers(secret, body, msg, now), channel.timeout_seconds)
    return classify_http("webhook", reply, reply.body[:300].decode("utf-8", errors="replace"))
