"""The listener's PDU guard: every byte a peer sends is checked against the DICOM Upper Layer grammar
(PS3.8 9.3) before pynetdicom buffers it, and an association that breaks the rules is aborted.

pynetdicom reads a PDU by its announced length (up to 4 GiB) into memory as it streams, keeps a DIMSE
command set of any size in memory, decodes a data set on a presentation context it rejected (the
reactor thread dies of the KeyError, leaving the association hanging and a temp file in the spool's
staging folder), and buffers the data set of any message but a C-STORE in memory. None of that is
configurable, so the guard sits below it, in the socket: the accepted connection is a socket subclass
(`GuardedSocket`, or `GuardedSSLSocket` through ``SSLContext.sslsocket_class``) whose ``recv`` feeds
what it returns through `PduInspector` and whose ``send`` shows it the A-ASSOCIATE-AC that names the
accepted contexts. pynetdicom only ever calls ``recv``/``send`` on the socket it is handed; the guard
uses no pynetdicom internals. On a violation the guard sends an A-ABORT (source: service provider),
shuts the connection down and returns end-of-file, which pynetdicom handles as a closed transport
(A-P-ABORT indication: EVT_ABORTED, whose handler removes any partial data set).

Memory: a PDU's announced length must fit the advertised maximum (P-DATA-TF) and, before its body is
read, a share of one receive budget shared by all connections; the share is returned once the body has
been read. A PDU that does not fit waits for the budget (TCP pushes back on the sender meanwhile) up to
a deadline, then the association is aborted.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any

from service.core.status import ReasonCode

__all__ = ["GuardLimits", "GuardedSSLSocket", "GuardedSocket", "PduInspector", "ReceiveBudget", "guard"]

log = logging.getLogger(__name__)

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
_PDU_TYPES = frozenset(range(0x01, 0x08))
_PRESENTATION_CONTEXT_AC = 0x21
_C_STORE_RQ = 0x0001
_NO_DATA_SET = 0x0101
# A-ABORT reasons (PS3.8 9.3.8) with the service provider as source.
_ABORT_INVALID_PARAMETER = 0x06
_ABORT_NOT_SPECIFIED = 0x00
# Association negotiation PDUs: 128 presentation contexts with a dozen transfer syntaxes each and a
# user identity are well under this.
_MAX_NEGOTIATION_PDU = 256 * 1024
# A peer's Maximum Length below this leaves pynetdicom no room for a PDV fragment (it needs 8 bytes past
# the PDU and PDV headers): it could answer nothing on the association.
_MIN_PEER_MAXIMUM = 14


class ReceiveBudget:
    """Bytes of PDUs being received at once across all connections."""

    def __init__(self, total: int) -> None:
        self.total = total
        self._used = 0
        self._cond = threading.Condition()

    @property
    def used(self) -> int:
        with self._cond:
            return self._used

    def acquire(self, size: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._used + size > self.total:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            self._used += size
            return True

    def release(self, size: int) -> None:
        with self._cond:
            self._used -= size
            self._cond.notify_all()


@dataclass(frozen=True)
class GuardLimits:
    max_pdu: int  # the Maximum Length we advertise for P-DATA-TF PDUs
    max_instance_bytes: int  # data set bytes of one C-STORE (streamed to disk by pynetdicom)
    budget: ReceiveBudget
    budget_wait: float  # seconds a PDU may wait for the receive budget
    # A command set is a few hundred bytes; other messages' data sets are kept in memory by pynetdicom.
    max_command_bytes: int = 64 * 1024
    max_other_data_set_bytes: int = 1024 * 1024


class Violation(Exception):
    def __init__(self, reason: ReasonCode, abort_reason: int = _ABORT_INVALID_PARAMETER) -> None:
        super().__init__(str(reason))
        self.reason = reason
        self.abort_reason = abort_reason


class PduInspector:
    """Follows one connection's incoming PDU stream byte by byte; raises Violation on a breach.

    Pure bookkeeping over bytes (no I/O): `feed` takes what the peer sent, `sent` what we sent.
    """

    def __init__(self, limits: GuardLimits) -> None:
        self.limits = limits
        self._header = b""  # a PDU header (6 bytes) being collected
        self._pdu_type = 0
        self._left = 0  # bytes of the current PDU body still to come
        self._reserved = 0  # budget held for the current PDU
        self._pdv = b""  # a PDV item header (6 bytes) being collected, inside a P-DATA-TF
        self._pdv_left = 0  # fragment bytes of the current PDV item still to come
        self._pdv_context = 0
        self._pdv_is_command = False
        self._pdv_last = False
        self._body_left = 0  # bytes of the current P-DATA-TF body not yet parsed
        self._accepted: set[int] | None = None  # context IDs of our A-ASSOCIATE-AC
        self._sent_buffer = b""
        self._request = b""  # the body of an A-ASSOCIATE-RQ being received
        # The DIMSE message being received.
        self._command = b""
        self._command_done = False
        self._message_context = 0
        self._data_limit = 0
        self._data_bytes = 0

    # -------------------------------------------------------------------------------------- incoming

    def feed(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            if self._left == 0 and len(self._header) < 6:
                take = 6 - len(self._header)
                self._header += bytes(view[:take])
                view = view[take:]
                if len(self._header) == 6:
                    self._start_pdu()
                continue
            take = min(self._left, len(view))
            if self._pdu_type == P_DATA_TF:
                self._pdata(view[:take])
            elif self._pdu_type == A_ASSOCIATE_RQ:
                self._request += bytes(view[:take])  # at most the negotiation limit
            view = view[take:]
            self._left -= take
            if self._left == 0:
                self._end_pdu()

    def _start_pdu(self) -> None:
        pdu_type, _, length = struct.unpack(">BBL", self._header)
        if pdu_type not in _PDU_TYPES:
            raise Violation(ReasonCode.PROTOCOL_VIOLATION, 0x01)  # unrecognized PDU
        limit = (
            self.limits.max_pdu if pdu_type == P_DATA_TF else max(self.limits.max_pdu, _MAX_NEGOTIATION_PDU)
        )
        if length > limit:
            raise Violation(ReasonCode.PDU_TOO_LARGE)
        if pdu_type == P_DATA_TF and self._accepted is None:
            raise Violation(ReasonCode.PROTOCOL_VIOLATION, 0x02)  # unexpected PDU: no association yet
        if not self.limits.budget.acquire(length, self.limits.budget_wait):
            raise Violation(ReasonCode.RECEIVE_MEMORY_BUSY, _ABORT_NOT_SPECIFIED)
        self._pdu_type, self._left, self._reserved = pdu_type, length, length
        self._pdv, self._pdv_left, self._body_left = b"", 0, length
        if length == 0:
            self._end_pdu()

    def _end_pdu(self) -> None:
        if self._pdu_type == P_DATA_TF and (self._pdv or self._pdv_left):
            raise Violation(ReasonCode.PROTOCOL_VIOLATION)  # a PDV item overruns its PDU
        if self._pdu_type == A_ASSOCIATE_RQ:
            maximum = _requested_maximum_length(self._request)
            self._request = b""
            if maximum is not None and 0 < maximum < _MIN_PEER_MAXIMUM:
                # pynetdicom cannot fragment any answer that small: every response would fail.
                raise Violation(ReasonCode.PROTOCOL_VIOLATION)
        self.release()
        self._header = b""

    def release(self) -> None:
        if self._reserved:
            self.limits.budget.release(self._reserved)
            self._reserved = 0

    def _pdata(self, body: memoryview) -> None:
        while body:
            if self._pdv_left == 0:
                take = 6 - len(self._pdv)
                self._pdv += bytes(body[:take])
                self._body_left -= min(take, len(body))
                body = body[take:]
                if len(self._pdv) == 6:
                    self._start_pdv()
                continue
            take = min(self._pdv_left, len(body))
            self._fragment(body[:take])
            body = body[take:]
            self._body_left -= take
            self._pdv_left -= take
            if self._pdv_left == 0:
                self._end_pdv()

    def _start_pdv(self) -> None:
        length, context, control = struct.unpack(">LBB", self._pdv)
        if length < 2 or length - 2 > self._body_left:
            raise Violation(ReasonCode.PROTOCOL_VIOLATION)  # the item overruns its PDU
        assert self._accepted is not None
        if context not in self._accepted:
            # pynetdicom would decode it (and, for a C-STORE, die on the unknown context).
            raise Violation(ReasonCode.PROTOCOL_VIOLATION)
        self._pdv_context = context
        self._pdv_is_command = bool(control & 0x01)
        self._pdv_last = bool(control & 0x02)
        if self._pdv_is_command:
            if self._command_done:
                raise Violation(ReasonCode.PROTOCOL_VIOLATION)  # a new command before the data set
            if self._command and context != self._message_context:
                raise Violation(ReasonCode.PROTOCOL_VIOLATION)
        elif not self._command_done or context != self._message_context:
            raise Violation(ReasonCode.PROTOCOL_VIOLATION)  # a data set without its command
        self._message_context = context
        self._pdv_left = length - 2
        if self._pdv_left == 0:
            self._end_pdv()

    def _fragment(self, data: memoryview) -> None:
        if self._pdv_is_command:
            if len(self._command) + len(data) > self.limits.max_command_bytes:
                raise Violation(ReasonCode.PROTOCOL_VIOLATION)
            self._command += bytes(data)
        else:
            self._data_bytes += len(data)
            if self._data_bytes > self._data_limit:
                too_large = self._data_limit == self.limits.max_instance_bytes
                raise Violation(ReasonCode.INSTANCE_TOO_LARGE if too_large else ReasonCode.PROTOCOL_VIOLATION)

    def _end_pdv(self) -> None:
        self._pdv = b""
        if not self._pdv_last:
            return
        if self._pdv_is_command:
            command_field, data_set_type = _command_fields(self._command)
            if data_set_type == _NO_DATA_SET:
                self._next_message()
                return
            self._command_done = True
            self._data_bytes = 0
            self._data_limit = (
                self.limits.max_instance_bytes
                if command_field == _C_STORE_RQ
                else self.limits.max_other_data_set_bytes
            )
        else:
            self._next_message()

    def _next_message(self) -> None:
        self._command, self._command_done, self._data_bytes = b"", False, 0

    # -------------------------------------------------------------------------------------- outgoing

    def sent(self, data: bytes) -> None:
        """Follow what we send, to learn the presentation contexts our A-ASSOCIATE-AC accepted."""
        if self._accepted is not None:
            return
        self._sent_buffer += data
        while len(self._sent_buffer) >= 6:
            pdu_type, _, length = struct.unpack(">BBL", self._sent_buffer[:6])
            if len(self._sent_buffer) < 6 + length:
                return
            pdu, self._sent_buffer = self._sent_buffer[: 6 + length], self._sent_buffer[6 + length :]
            if pdu_type == A_ASSOCIATE_AC:
                self._accepted = _accepted_contexts(pdu)
                self._sent_buffer = b""
                return


def _accepted_contexts(pdu: bytes) -> set[int]:
    """Presentation context IDs with result 0 (acceptance) in an A-ASSOCIATE-AC (PS3.8 9.3.3)."""
    accepted: set[int] = set()
    pos = 6 + 68  # fixed fields up to the variable items
    while pos + 4 <= len(pdu):
        item_type = pdu[pos]
        (length,) = struct.unpack(">H", pdu[pos + 2 : pos + 4])
        if item_type == _PRESENTATION_CONTEXT_AC and length >= 4 and pos + 8 <= len(pdu):
            context_id, result = pdu[pos + 4], pdu[pos + 6]
            if result == 0:
                accepted.add(context_id)
        pos += 4 + length
    return accepted


def _requested_maximum_length(body: bytes) -> int | None:
    """The Maximum Length Received in an A-ASSOCIATE-RQ body's user information (PS3.8 D.1), if any."""
    pos = 68
    while pos + 4 <= len(body):
        item_type = body[pos]
        (length,) = struct.unpack(">H", body[pos + 2 : pos + 4])
        if item_type == 0x50:
            sub, end = pos + 4, min(pos + 4 + length, len(body))
            while sub + 4 <= end:
                (sub_length,) = struct.unpack(">H", body[sub + 2 : sub + 4])
                if body[sub] == 0x51 and sub_length == 4 and sub + 8 <= end:
                    return int(struct.unpack(">L", body[sub + 4 : sub + 8])[0])
                sub += 4 + sub_length
            return None
        pos += 4 + length
    return None


def _command_fields(command: bytes) -> tuple[int, int]:
    """(Command Field, Command Data Set Type) of a command set (implicit VR little endian, group 0000)."""
    fields: dict[int, int] = {}
    pos = 0
    while pos + 8 <= len(command):
        group, element, length = struct.unpack("<HHL", command[pos : pos + 8])
        value = command[pos + 8 : pos + 8 + length]
        if group == 0x0000 and element in (0x0100, 0x0800) and len(value) == 2:
            fields[element] = struct.unpack("<H", value)[0]
        pos += 8 + length
    if 0x0100 not in fields or 0x0800 not in fields:
        raise Violation(ReasonCode.PROTOCOL_VIOLATION)  # pynetdicom could not dispatch it either
    return fields[0x0100], fields[0x0800]


# ---------------------------------------------------------------------------------------------- sockets


class _GuardMixin:
    """What GuardedSocket and GuardedSSLSocket add to their socket class."""

    _inspector: PduInspector | None
    _peer: str
    _refused: bool

    def _guard_setup(self, limits: GuardLimits, peer: str) -> None:
        self._inspector = PduInspector(limits)
        self._peer = peer
        self._refused = False

    def recv(self, bufsize: int = 1024, flags: int = 0) -> bytes:
        if self._refused:
            return b""
        data: bytes = super().recv(bufsize, flags)  # type: ignore[misc]
        if self._inspector is not None and data:
            try:
                self._inspector.feed(data)
            except Violation as exc:
                self._refuse(exc)
                return b""  # pynetdicom never sees the offending bytes: a short PDU, a closed transport
        return data

    def send(self, data: Any, flags: int = 0) -> int:
        sent: int = super().send(data, flags)  # type: ignore[misc]
        if self._inspector is not None:
            self._inspector.sent(bytes(data[:sent]))
        return sent

    def sendall(self, data: Any, flags: int = 0) -> None:
        super().sendall(data, flags)  # type: ignore[misc]
        if self._inspector is not None:
            self._inspector.sent(bytes(data))

    def close(self) -> None:
        if self._inspector is not None:
            self._inspector.release()
        super().close()  # type: ignore[misc]

    def _refuse(self, exc: Violation) -> None:
        """A-ABORT to the peer, then end-of-file for pynetdicom (it sees the transport close)."""
        self._refused = True
        log.warning("association aborted reason=%s address=%s", exc.reason, self._peer)
        assert self._inspector is not None
        self._inspector.release()
        abort = struct.pack(">BBLBBBB", A_ABORT, 0, 4, 0, 0, 0x02, exc.abort_reason)
        with contextlib.suppress(OSError, ValueError):
            super().sendall(abort)  # type: ignore[misc]
        with contextlib.suppress(OSError, ValueError):
            self.shutdown(socket.SHUT_RDWR)  # type: ignore[attr-defined]


class GuardedSocket(_GuardMixin, socket.socket):
    """An accepted plain TCP connection under the PDU guard."""


class GuardedSSLSocket(_GuardMixin, ssl.SSLSocket):
    """An accepted TLS connection under the PDU guard (made by ``SSLContext.wrap_socket``)."""

    _inspector = None  # until _guard_setup: the TLS handshake runs unguarded


def guard(client: socket.socket, limits: GuardLimits, peer: str) -> socket.socket:
    """``client`` (just accepted, or wrapped by a context whose sslsocket_class is GuardedSSLSocket)
    under the guard."""
    if isinstance(client, GuardedSSLSocket):
        client._guard_setup(limits, peer)
        return client
    guarded = GuardedSocket(client.family, client.type, client.proto, fileno=client.detach())
    guarded._guard_setup(limits, peer)
    return guarded
