"""service.scp.pynetdicom_compat reads pynetdicom internals: these fail loudly when they change."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path

import pytest
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RQ, DIMSEMessage
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode

from service.scp.pynetdicom_compat import discard_received_files, received_files
from tests.support import pdu as P
from tests.support.hostile import chest_cr
from tests.support.ingest import ingest_settings, running_listener, wait_for


def test_the_attributes_it_reads_still_exist() -> None:
    assert "self.msg_queue" in inspect.getsource(DIMSEServiceProvider.__init__)
    assert "self.message" in inspect.getsource(DIMSEServiceProvider)
    assert hasattr(C_STORE_RQ(), "_data_set_file")
    assert "_data_set_file" in inspect.getsource(DIMSEMessage.decode_msg)
    assert hasattr(C_STORE(), "_dataset_file")


def test_it_finds_and_deletes_a_data_set_being_received(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shared_dir: Path
) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    data = encode(chest_cr(), False, True)
    assert data is not None
    with (
        running_listener(ingest_settings(tmp_path)) as listener,
        P.RawPeer(listener.settings.listener_port) as peer,
    ):
        peer.associate()
        peer.send(P.c_store_rq("1.2.3.4") + P.p_data(P.pdv(1, 0x00, data[:5000])))
        assoc = wait_for(lambda: listener.open_associations(established=True))[0]
        files = wait_for(lambda: received_files(assoc))
        assert files == list(staging.iterdir())
        assert discard_received_files(assoc) == 1
        assert list(staging.iterdir()) == []
