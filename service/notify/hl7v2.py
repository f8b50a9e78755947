"""HL7 v2.5 ORU^R01 for an urgent finding, MLLP framing, and reading the receiver's ACK (pure functions).

Layout (docs/integration.md has a sample): PID (patient id, name), ORC/OBR with the accession number as
filler order number (ORC-3, OBR-3) and placer field 1 (OBR-18, as IHE Radiology puts it), the priority in
ORC-7.6 / OBR-27.6 (TQ, table 0027: S stat, A asap, R routine) and TQ1-9, then OBX: the finding (CWE,
present, abnormal flag AA for stat), its score (NM), the algorithm (ST) and the Study Instance UID (ST);
NTE carries the disclaimer. A changed result is sent with result status C (corrected) instead of F.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from service.notify import codes
from service.notify.config import Hl7Channel, Priority
from service.notify.message import Urgent

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c\x0d"
_PRIORITY_TEXT = {Priority.STAT: "Stat", Priority.ASAP: "ASAP", Priority.ROUTINE: "Routine"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def escape(value: object) -> str:
    """A value for one HL7 component: the delimiters escaped (escape character first), control
    characters (segment separators among them) replaced by spaces."""
    text = _CONTROL.sub(" ", str(value))
    for char, seq in (("\\", "\\E\\"), ("|", "\\F\\"), ("^", "\\S\\"), ("&", "\\T\\"), ("~", "\\R\\")):
        text = text.replace(char, seq)
    return text


def _components(*parts: object) -> str:
    return "^".join(escape(p) for p in parts).rstrip("^")


def _code(code: codes.Code) -> str:
    return _components(code.code, code.display, code.system)


def _ts(when: datetime) -> str:
    return when.astimezone(UTC).strftime("%Y%m%d%H%M%S+0000")


def _name(pn: str | None) -> str:
    """DICOM PN (family^given^middle^prefix^suffix) as XPN (family^given^middle^suffix^prefix)."""
    if not pn:
        return ""
    parts = (pn.split("=")[0].split("^") + [""] * 5)[:5]
    return _components(parts[0], parts[1], parts[2], parts[4], parts[3])


def build_oru(msg: Urgent, channel: Hl7Channel, now: datetime) -> str:
    """The ORU^R01 message (segments joined by CR, no MLLP framing)."""
    status = "C" if msg.corrected else "F"
    priority = msg.priority.hl7
    tq = "^^^^^" + priority  # TQ component 6: priority
    accession = escape(msg.accession_number or "")
    filler = _components(msg.accession_number or "", channel.sending_application)
    flag = "AA" if msg.priority == Priority.STAT else "A"
    finding = codes.finding(msg.label)
    score_code = codes.PROBABILITY if msg.score_kind == "probability" else codes.SCORE
    observed = _ts(msg.observed_at)
    segments = [
        "|".join(
            [
                "MSH",
                "^~\\&",
                escape(channel.sending_application),
                escape(channel.sending_facility),
                escape(channel.receiving_application),
                escape(channel.receiving_facility),
                _ts(now),
                "",
                "ORU^R01^ORU_R01",
                escape(msg.control_id),
                channel.processing_id,
                "2.5",
            ]
        ),
        f"PID|1||{escape(msg.patient_id or '')}||{_name(msg.patient_name)}",
        f"ORC|RE||{filler}||CM||{tq}",
        "|".join(
            [
                "OBR",
                "1",
                "",
                filler,
                _components("CXR_AI", "AI chest X-ray findings", codes.LOCAL),
                "",
                "",
                observed,  # OBR-7
                *[""] * 10,  # OBR-8 .. OBR-17
                accession,  # OBR-18 placer field 1: the accession number
                "",
                "",
                "",
                _ts(now),  # OBR-22 results reported
                "",
                "",
                status,  # OBR-25
                "",
                tq,  # OBR-27
            ]
        ),
        f"NTE|1|L|{escape(codes.DISCLAIMER)}",
        f"TQ1|1||||||||{_components(priority, _PRIORITY_TEXT[msg.priority], 'HL70485')}",
        f"OBX|1|CWE|{_code(finding)}|1|{_code(codes.PRESENT)}|||{flag}|||{status}|||{observed}",
        f"NTE|1|L|{escape(codes.DISCLAIMER)}",
        f"OBX|2|NM|{_code(score_code)}|1|{msg.score:.4f}|1^^UCUM|||||{status}|||{observed}",
        f"OBX|3|ST|{_code(codes.ALGORITHM)}|1|{escape(f'{msg.bundle_name} {msg.bundle_version}')}"
        f"||||||{status}|||{observed}",
        f"OBX|4|ST|{_code(codes.STUDY_UID)}|1|{escape(msg.study_instance_uid)}||||||{status}|||{observed}",
    ]
    return "\r".join(segments) + "\r"


def frame(message: str) -> bytes:
    """MLLP: start block, the message, end block and carriage return."""
    return START_BLOCK + message.encode("utf-8") + END_BLOCK


class AckKind(StrEnum):
    ACCEPTED = "accepted"  # AA / CA
    RETRY = "retry"  # AE / CE (an error the receiver may not have next time), or ERR 206/207
    REJECTED = "rejected"  # AR / CR, or an ERR code that says the message itself is wrong


@dataclass(frozen=True)
class Ack:
    kind: AckKind
    code: str  # MSA-1
    reason: str  # a reason code for logs and metrics
    text: str  # what the receiver said (MSA-3, ERR-8): shown in the dashboard, never logged


# HL7 table 0357: record locked and internal error are the receiver's momentary state; the rest (segment,
# field, data type, table value, unsupported type/event/processing id/version, unknown or duplicate
# key) say the message will be refused again.
_TRANSIENT_ERRORS = {"206", "207"}


def read_ack(raw: bytes, control_id: str) -> Ack:
    """Classify an ACK (the bytes between the MLLP blocks). Per HL7 v2 original mode: AA accepted, AE an
    application error (retried: the receiver may accept it once its problem is fixed), AR rejected (the
    message type, version or processing id is refused: dead at once). An ERR-3 code, when given,
    decides instead. A reply that is no ACK to this message is treated as a transient protocol error."""
    text = raw.decode("utf-8", errors="replace").replace("\n", "\r")
    try:
        ack = parse_message(text, validation_level=VALIDATION_LEVEL.TOLERANT, find_groups=False)
        code = str(ack.msa.msa_1.value or "").strip().upper()
        acked = str(ack.msa.msa_2.value or "").strip()
        said = str(ack.msa.msa_3.value or "").strip()
        err = ack.err if any(c.name == "ERR" for c in ack.children) else None
        err_code = str(err.err_3.err_3_1.value or "").strip() if err is not None else ""
        if err is not None and err.err_8.value:
            said = f"{said} {err.err_8.value}".strip()
    except Exception as exc:  # hl7apy raises many kinds for a reply that is not HL7
        return Ack(AckKind.RETRY, "", "hl7_ack_unreadable", type(exc).__name__)
    if acked != control_id:
        return Ack(AckKind.RETRY, code, "hl7_ack_mismatch", f"MSA-2 {acked!r} is not {control_id!r}")
    if code in {"AA", "CA"}:
        return Ack(AckKind.ACCEPTED, code, "hl7_aa", said)
    detail = f"{code} {err_code} {said}".strip()
    if err_code:
        transient = err_code in _TRANSIENT_ERRORS
        kind = AckKind.RETRY if transient else AckKind.REJECTED
        return Ack(kind, code, f"hl7_{code.lower()}_{err_code}", detail)
    if code in {"AE", "CE"}:
        return Ack(AckKind.RETRY, code, f"hl7_{code.lower()}", detail)
    if code in {"AR", "CR"}:
        return Ack(AckKind.REJECTED, code, f"hl7_{code.lower()}", detail)
    return Ack(AckKind.RETRY, code, "hl7_ack_unknown_code", detail)
