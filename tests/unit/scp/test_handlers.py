"""The C-STORE handler's answers when what pynetdicom hands it is not what it expects."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pynetdicom.dimse_primitives import C_ECHO

from service.scp.handlers import AssociationStudies, make_store_handler
from service.scp.intake import StoreStatus
from service.scp.peers import PeerPolicy


class _NoIntake:
    def store(self, rx: Any) -> Any:
        raise AssertionError("intake must not be reached")


def test_a_request_that_is_not_a_c_store_costs_a_retry_not_the_listener(tmp_path: Path) -> None:
    handler = make_store_handler(_NoIntake(), PeerPolicy([]), AssociationStudies(), tmp_path)  # type: ignore[arg-type]
    assoc = SimpleNamespace(requestor=SimpleNamespace(ae_title="MODALITY", address="127.0.0.1"))
    event = SimpleNamespace(assoc=assoc, request=C_ECHO())
    assert handler(event) == StoreStatus.OUT_OF_RESOURCES  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
