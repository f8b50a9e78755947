"""The one SCU against a real pynetdicom SCP: how each answer of a destination reads to the worker."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from service.core.errors import PermanentError, TransientError
from service.core.status import ReasonCode
from service.dicomnet.scu import Peer, c_store, echo
from tests.support.net import free_port

Pacs = Callable[..., int]


@pytest.fixture
def chest(shared_dir: Path) -> Path:
    return shared_dir / "dicom" / "chest" / "cr-pa-mono1-explicit-le.dcm"


@pytest.fixture
def pacs() -> Iterator[Callable[..., int]]:
    """Starts a PACS answering every C-STORE with ``status``; returns its port."""
    servers: list[Any] = []

    def start(status: int, calling: list[str] | None = None) -> int:
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        if calling:
            ae.require_calling_aet = calling
        port = free_port()
        handlers = [(evt.EVT_C_STORE, lambda _event: status)]
        servers.append(ae.start_server(("127.0.0.1", port), block=False, evt_handlers=handlers))
        return port

    yield start
    for server in servers:
        server.shutdown()


def _send(path: Path, port: int) -> None:
    c_store(path, ae_title="PACS", host="127.0.0.1", port=port, calling_ae_title="GW", timeout=5)


def test_a_stored_object_returns(chest: Path, pacs: Pacs) -> None:
    _send(chest, pacs(0x0000))
    _send(chest, pacs(0xB000))  # a warning is stored too


@pytest.mark.parametrize(
    ("status", "error", "detail"),
    [
        (0xA700, TransientError, "peer out of resources 0xA700"),
        (0xC000, PermanentError, "C-STORE status 0xC000"),
    ],
)
def test_a_failure_status_is_transient_only_when_out_of_resources(
    chest: Path, pacs: Pacs, status: int, error: type[Exception], detail: str
) -> None:
    with pytest.raises(error, match=detail):
        _send(chest, pacs(status))


def test_a_peer_down_is_transient_and_a_rejection_permanent(chest: Path, pacs: Pacs) -> None:
    with pytest.raises(TransientError) as down:
        _send(chest, free_port())
    assert down.value.reason == ReasonCode.DELIVERY_UNREACHABLE
    with pytest.raises(PermanentError) as rejected:
        _send(chest, pacs(0x0000, calling=["SOMEONE_ELSE"]))
    assert rejected.value.reason == ReasonCode.DELIVERY_REFUSED
    assert rejected.value.detail == "association rejected"


def test_echo_says_what_went_wrong(pacs: Pacs) -> None:
    down = echo(Peer("PACS", "127.0.0.1", free_port()), calling_ae_title="GW", timeout=2)
    assert (down.ok, down.detail) == (False, "no association (peer unreachable or not DICOM)")
    port = pacs(0x0000, calling=["SOMEONE_ELSE"])
    rejected = echo(Peer("PACS", "127.0.0.1", port), calling_ae_title="GW", timeout=2)
    assert rejected.detail == "association rejected (AE title or address not accepted)"
