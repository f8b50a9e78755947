"""A real MLLP listener for tests: parses each HL7 v2 message with hl7apy (strict v2.5 validation) and
answers AA, AE, AR (with an optional ERR code) or nothing at all, as the test configures it."""

from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

START, END = b"\x0b", b"\x1c\x0d"


@dataclass
class Received:
    raw: str
    message: Any  # hl7apy Message
    at: float  # time.monotonic() when it was read


@dataclass
class MllpListener:
    """``answers``: one code per message in turn ("AA", "AE", "AR", "AE:207", or "none" for no ACK);
    the last one repeats."""

    answers: list[str] = field(default_factory=lambda: ["AA"])
    received: list[Received] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    port: int = 0

    def __post_init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> MllpListener:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._sock.close()
        self._thread.join(timeout=5)

    def _serve(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            data = b""
            while END not in data:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                data += chunk
            text = data[data.index(START) + 1 : data.index(END)].decode()
            try:
                message = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT)
            except Exception as exc:  # a message the library refuses is a test failure, reported
                self.errors.append(f"{type(exc).__name__}: {exc}")
                message = None
            self.received.append(Received(text, message, time.monotonic()))
            answer = self.answers[min(len(self.received), len(self.answers)) - 1]
            if answer == "none":
                self._stop.wait(30)  # hold the connection open, never answer
                return
            control = text.split("\r")[0].split("|")[9]
            code, _, err = answer.partition(":")
            segments = [
                f"MSH|^~\\&|RIS|HOSP|CXR_GATEWAY||20260101000000||ACK^R01^ACK|ACK{len(self.received)}|P|2.5",
                f"MSA|{code}|{control}|test peer says {code}",
            ]
            if err:
                segments.append(f"ERR|||{err}^error^HL70357|E||||detail {err}")
            conn.sendall(START + "\r".join(segments).encode() + b"\r" + END)
