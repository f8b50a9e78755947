"""DICOM Upper Layer PDUs by hand (PS3.8 9.3), for peers that break the protocol on purpose."""

from __future__ import annotations

import contextlib
import socket
import struct
import time
from collections.abc import Sequence

from pydicom import Dataset
from pynetdicom.dsutils import encode

VERIFICATION = "1.2.840.10008.1.1"
CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"

A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, P_DATA_TF = 0x01, 0x02, 0x03, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07

Context = tuple[int, str, Sequence[str]]  # (ID, abstract syntax, transfer syntaxes)


def item(item_type: int, value: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(value)) + value


def pdu(pdu_type: int, body: bytes) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body)) + body


def associate_rq(
    called: str = "CXR_GATEWAY",
    calling: str = "HOSTILE",
    contexts: Sequence[Context] = (
        (1, CR_STORAGE, (EXPLICIT_LE, IMPLICIT_LE)),
        (3, VERIFICATION, (IMPLICIT_LE,)),
    ),
    max_pdu: int = 16384,
) -> bytes:
    items = item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, syntaxes in contexts:
        sub = item(0x30, abstract.encode()) + b"".join(item(0x40, ts.encode()) for ts in syntaxes)
        items += item(0x20, bytes([context_id, 0, 0, 0]) + sub)
    items += item(0x50, item(0x51, struct.pack(">L", max_pdu)) + item(0x52, b"1.2.826.0.1.3680043.9.7"))
    body = (
        struct.pack(">HH", 1, 0) + called.encode().ljust(16) + calling.encode().ljust(16) + bytes(32) + items
    )
    return pdu(A_ASSOCIATE_RQ, body)


def pdv(context_id: int, control: int, data: bytes) -> bytes:
    """A presentation data value item: control bit 0 = command, bit 1 = last fragment."""
    return struct.pack(">LBB", len(data) + 2, context_id, control) + data


def p_data(*pdvs: bytes) -> bytes:
    return pdu(P_DATA_TF, b"".join(pdvs))


def release_rq() -> bytes:
    return pdu(A_RELEASE_RQ, bytes(4))


def release_rp() -> bytes:
    return pdu(A_RELEASE_RP, bytes(4))


def abort() -> bytes:
    return pdu(A_ABORT, bytes([0, 0, 0, 0]))


def command_set(command_field: int, sop_class: str, sop_instance: str = "", *, data_set: bool) -> bytes:
    """A DIMSE command set (implicit VR little endian, with its group length)."""
    ds = Dataset()
    ds.AffectedSOPClassUID = sop_class
    ds.CommandField = command_field
    ds.MessageID = 1
    if command_field == 0x0001:
        ds.Priority = 0
    ds.CommandDataSetType = 0x0000 if data_set else 0x0101
    if sop_instance:
        ds.AffectedSOPInstanceUID = sop_instance
    encoded = encode(ds, True, True)
    assert encoded is not None
    return struct.pack("<HHLL", 0, 0, 4, len(encoded)) + encoded


def c_store_rq(sop_instance: str, context_id: int = 1) -> bytes:
    return p_data(pdv(context_id, 0x03, command_set(0x0001, CR_STORAGE, sop_instance, data_set=True)))


def c_echo_rq(context_id: int = 3) -> bytes:
    return p_data(pdv(context_id, 0x03, command_set(0x0030, VERIFICATION, data_set=False)))


class RawPeer:
    """A TCP connection that sends whatever bytes it is given and reads PDUs back."""

    def __init__(self, port: int, timeout: float = 10.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self._buffer = b""

    def send(self, data: bytes) -> bool:
        """False once the listener has closed the connection."""
        try:
            self.sock.sendall(data)
            return True
        except OSError:
            return False

    def read_pdu(self, timeout: float = 10.0) -> tuple[int, bytes] | None:
        """The next PDU (type, body), or None at end of file."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self._buffer) >= 6:
                pdu_type, _, length = struct.unpack(">BBL", self._buffer[:6])
                if len(self._buffer) >= 6 + length:
                    body, self._buffer = self._buffer[6 : 6 + length], self._buffer[6 + length :]
                    return pdu_type, body
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no PDU from the listener")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                return None
            self._buffer += chunk

    def read_all(self, timeout: float = 10.0) -> list[int]:
        """Types of every PDU until the listener closes the connection (TimeoutError if it does not)."""
        types = []
        while (got := self.read_pdu(timeout)) is not None:
            types.append(got[0])
        return types

    def associate(self, rq: bytes | None = None) -> bytes:
        """Send an A-ASSOCIATE-RQ; the A-ASSOCIATE-AC's body (AssertionError on anything else)."""
        self.send(rq or associate_rq())
        got = self.read_pdu()
        assert got is not None and got[0] == A_ASSOCIATE_AC, got
        return got[1]

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def __enter__(self) -> RawPeer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def c_store_status(body: bytes) -> int | None:
    """The Status of a C-STORE-RSP (or any response) in a P-DATA-TF body, if it holds one."""
    pos = 0
    while pos + 6 <= len(body):
        (length,) = struct.unpack(">L", body[pos : pos + 4])
        data = body[pos + 6 : pos + 4 + length]
        at = data.find(b"\x00\x00\x00\x09\x02\x00\x00\x00")  # (0000,0900) US, length 2
        if at >= 0:
            return int(struct.unpack("<H", data[at + 8 : at + 10])[0])
        pos += 4 + length
    return None
