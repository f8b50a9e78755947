from __future__ import annotations

import ssl
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.settings import Destination, load_settings
from service.core.tls import client_context


def test_new_settings_keep_safe_defaults(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path)
    assert s.sources == []
    assert s.listener_plaintext and s.listener_tls_port is None
    assert s.spool_min_free_bytes == 1024**3
    assert (s.listener_network_timeout, s.listener_acse_timeout, s.listener_dimse_timeout) == (60, 30, 60)
    assert Destination(ae_title="PACS", host="h", port=104).tls is False


def test_sources_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CXR_SOURCES", '[{"ae_title": " PACS ", "host": "10.0.0.0/8"}]')
    [source] = load_settings(data_dir=tmp_path).sources
    assert (source.ae_title, source.host) == ("PACS", "10.0.0.0/8")
    monkeypatch.setenv("CXR_SOURCES", '[{"ae_title": "A\\\\B", "host": "10.0.0.1"}]')
    with pytest.raises(ValidationError):
        load_settings(data_dir=tmp_path)


def test_tls_settings_must_be_complete(tmp_path: Path) -> None:
    with pytest.raises(ValidationError):
        load_settings(data_dir=tmp_path, listener_tls_port=2762)
    with pytest.raises(ValidationError):
        load_settings(data_dir=tmp_path, tls_require_client_cert=True)
    with pytest.raises(ValidationError):
        load_settings(data_dir=tmp_path, listener_plaintext=False)


def test_client_context_verifies_the_server_and_refuses_old_tls(tmp_path: Path) -> None:
    ctx = client_context(load_settings(data_dir=tmp_path))
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2
    assert ctx.verify_mode == ssl.CERT_REQUIRED
    assert ctx.check_hostname
    assert not client_context(load_settings(data_dir=tmp_path, tls_check_hostname=False)).check_hostname
