"""DICOMweb destinations and STOW-RS sources in the settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.settings import Destination, load_settings
from service.dicomweb.config import DicomwebDestination


def test_destinations_are_c_store_unless_typed_dicomweb(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CXR_DESTINATIONS",
        json.dumps(
            [
                {"ae_title": "PACS", "host": "h", "port": 104},
                {
                    "type": "dicomweb",
                    "name": "CLOUD",
                    "url": "https://vna.example/dicom-web/",
                    "outputs": ["sr"],
                },
            ]
        ),
    )
    pacs, cloud = load_settings().destinations
    assert isinstance(pacs, Destination) and pacs.type == "dimse"
    assert isinstance(cloud, DicomwebDestination)
    # A delivery row names a DICOMweb destination like a C-STORE one.
    assert (cloud.ae_title, cloud.host, cloud.port, cloud.tls) == (
        "CLOUD",
        "https://vna.example/dicom-web",
        443,
        True,
    )
    assert [str(k) for k in cloud.outputs] == ["sr"]


@pytest.mark.parametrize(
    "bad",
    [
        {"url": "ftp://x/dw"},
        {"url": "http://user:pw@x/dw"},  # credentials belong in auth files
        {"url": "http://x/dw?token=1"},
        {"name": "has space"},
        {"outputs": ["nope"]},
        {"auth": {"type": "basic", "username": "u"}},
        {"auth": {"type": "bearer"}},
    ],
)
def test_bad_dicomweb_destinations_are_refused(bad: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DicomwebDestination.model_validate({"type": "dicomweb", "name": "X", "url": "http://x/dw", **bad})


def test_dicomweb_names_and_sources_are_checked(tmp_path: Path) -> None:
    dw = {"type": "dicomweb", "name": "X", "url": "http://x/dw"}
    with pytest.raises(ValidationError, match="unique"):
        load_settings(data_dir=tmp_path, destinations=[dw, {**dw, "url": "http://y/dw"}])
    with pytest.raises(ValidationError, match="exactly one"):
        load_settings(data_dir=tmp_path, dicomweb_sources=[{"name": "RIS"}])
    with pytest.raises(ValidationError, match="64 hex"):
        load_settings(data_dir=tmp_path, dicomweb_sources=[{"name": "RIS", "token_sha256": "abc"}])
    with pytest.raises(ValidationError, match="differ"):
        load_settings(data_dir=tmp_path, listener_port=11112, dicomweb_port=11112)
