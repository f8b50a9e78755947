"""Who may send: CXR_SOURCES checks the calling AE title AND the source address (real echoscu/storescu)."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import pytest

from service.core.models import Instance
from service.core.settings import Settings, Source
from tests.support.dcmtk import echoscu, storescu
from tests.support.ingest import count, ingest_settings, running_listener, scu

CR = "dicom/chest/cr-pa-mono1-explicit-le.dcm"
CALLING_AE_NOT_RECOGNISED = "Calling AE Title Not Recognized"


def _echo(settings: Settings, calling: str, called: str = "CXR_GATEWAY") -> subprocess.CompletedProcess[str]:
    """DCMTK's echoscu to the listener as ``calling``."""
    return echoscu("127.0.0.1", settings.listener_port, called_aet=called, calling_aet=calling)


def _store(settings: Settings, path: Path, calling: str) -> subprocess.CompletedProcess[str]:
    """DCMTK's storescu of ``path`` to the listener as ``calling``."""
    return storescu(
        "127.0.0.1", settings.listener_port, [path], called_aet="CXR_GATEWAY", calling_aet=calling
    )


def test_allowed_peer_may_echo_and_store(tmp_path: Path, shared_dir: Path) -> None:
    settings = ingest_settings(tmp_path, sources=[Source(ae_title="MODALITY", host="127.0.0.1")])
    with running_listener(settings) as listener:
        echo = _echo(settings, "MODALITY")
        assert echo.returncode == 0, echo.stderr
        sent = _store(settings, shared_dir / CR, "MODALITY")
        assert sent.returncode == 0, sent.stderr
        assert count(listener, Instance) == 1


def test_unknown_calling_ae_title_is_rejected_permanently(tmp_path: Path, shared_dir: Path) -> None:
    settings = ingest_settings(tmp_path, sources=[Source(ae_title="MODALITY", host="127.0.0.1")])
    with running_listener(settings) as listener:
        echo = _echo(settings, "STRANGER")
        assert echo.returncode != 0
        assert "Rejected Permanent" in echo.stderr + echo.stdout
        assert CALLING_AE_NOT_RECOGNISED in echo.stderr + echo.stdout
        sent = _store(settings, shared_dir / CR, "STRANGER")
        assert sent.returncode != 0
        assert count(listener, Instance) == 0
        # The listener is still there for the peers it knows.
        ok = _echo(settings, "MODALITY")
        assert ok.returncode == 0, ok.stderr


def test_known_ae_title_from_another_host_is_rejected(tmp_path: Path) -> None:
    # The AE title is allowed, but only from 10.9.8.7: from 127.0.0.1 the address check must reject it.
    settings = ingest_settings(tmp_path, sources=[Source(ae_title="MODALITY", host="10.9.8.7")])
    with running_listener(settings):
        echo = _echo(settings, "MODALITY")
        assert echo.returncode != 0
        assert CALLING_AE_NOT_RECOGNISED in echo.stderr + echo.stdout

        # The A-ASSOCIATE-RJ fields exactly: rejected-permanent (1), service user (1), reason 3.
        assoc = scu("MODALITY").associate("127.0.0.1", settings.listener_port, ae_title="CXR_GATEWAY")
        assert assoc.is_rejected
        rj = assoc.acceptor.primitive
        assert rj is not None
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x01, 0x01, 0x03)


def test_networks_and_host_names_are_allowed(tmp_path: Path) -> None:
    settings = ingest_settings(
        tmp_path,
        sources=[Source(ae_title="SUBNET", host="127.0.0.0/8"), Source(ae_title="BYNAME", host="localhost")],
    )
    with running_listener(settings):
        for calling in ("SUBNET", "BYNAME"):
            echo = _echo(settings, calling)
            assert echo.returncode == 0, echo.stderr


def test_wrong_called_ae_title_is_rejected(tmp_path: Path) -> None:
    settings = ingest_settings(tmp_path, sources=[Source(ae_title="MODALITY", host="127.0.0.1")])
    with running_listener(settings):
        echo = _echo(settings, "MODALITY", called="NOT_US")
        assert echo.returncode != 0
        assert "Called AE Title Not Recognized" in echo.stderr + echo.stdout


def test_empty_source_list_accepts_anyone_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ingest_settings(tmp_path, sources=[])
    with caplog.at_level(logging.WARNING, logger="service.scp"), running_listener(settings):
        echo = _echo(settings, "ANYONE")
        assert echo.returncode == 0, echo.stderr
    assert any("CXR_SOURCES is empty" in r.getMessage() for r in caplog.records)


def test_sources_from_environment_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_SOURCES", '[{"ae_title": "MODALITY", "host": "10.9.8.7"}]')
    settings = ingest_settings(tmp_path)
    assert [(s.ae_title, s.host) for s in settings.sources] == [("MODALITY", "10.9.8.7")]
    with running_listener(settings):
        assoc = scu("MODALITY").associate("127.0.0.1", settings.listener_port, ae_title="CXR_GATEWAY")
        assert assoc.is_rejected
