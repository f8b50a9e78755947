"""A destination that accepts the connection and then never answers holds one delivery attempt for
CXR_DELIVERY_TIMEOUT_SECONDS, not for a fixed 30 s."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

from service.core.errors import TransientError
from service.core.settings import load_settings
from worker.senders import batch_sender_for


def test_a_silent_destination_fails_the_attempt_within_the_delivery_timeout(
    tmp_path: Path, shared_dir: Path
) -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept_and_say_nothing() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(silent.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept_and_say_nothing, daemon=True)
    thread.start()
    try:
        port = silent.getsockname()[1]
        settings = load_settings(data_dir=tmp_path, delivery_timeout_seconds=1.0)
        send = batch_sender_for(settings, ("PACS", "127.0.0.1", port))
        started = time.monotonic()
        (outcome,) = send([shared_dir / "dicom/chest/cr-pa-mono1-explicit-le.dcm"])
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        silent.close()
    assert isinstance(outcome, TransientError)  # tried again later, not dead-lettered
    assert accepted and elapsed < 10  # the default (30 s) would hold it three times as long at least
