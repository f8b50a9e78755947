from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.core.settings import Destination, load_settings
from service.core.status import OutputKind


def test_defaults_are_embedded(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in list(__import__("os").environ):
        if key.startswith("CXR_"):
            monkeypatch.delenv(key)
    s = load_settings(data_dir=tmp_path)
    assert s.listener_ae_title == "CXR_GATEWAY"
    assert s.listener_port == 11112
    assert s.dashboard_port == 8080
    assert s.dashboard_host == "127.0.0.1"
    assert s.study_quiet_seconds <= 2
    assert s.effective_database_url.startswith("sqlite:///")
    assert s.effective_broker_url == "filesystem://"
    assert (s.model_bundle / "configs" / "metadata.json").is_file()


def test_env_overrides_toml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    cfg = tmp_path / "cxr.toml"
    cfg.write_text(
        'listener_port = 104\nlistener_ae_title = "FROM_TOML"\n'
        '[[destinations]]\nae_title = "PACS"\nhost = "pacs.local"\nport = 11112\n'
    )
    monkeypatch.setenv("CXR_LISTENER_PORT", "4006")
    s = load_settings(cfg)
    assert s.listener_port == 4006
    assert s.listener_ae_title == "FROM_TOML"
    assert [d.ae_title for d in s.destinations] == ["PACS"]


def test_destinations_from_env_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CXR_DESTINATIONS", '[{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}]')
    s = load_settings()
    assert s.destinations[0].port == 4242


def test_bad_destination_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(
        "CXR_DESTINATIONS", '[{"ae_title": "THIS_AE_TITLE_IS_TOO_LONG", "host": "h", "port": 1}]'
    )
    with pytest.raises(ValidationError):
        load_settings()


def test_destination_outputs_default_and_choice(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(
        "CXR_DESTINATIONS",
        '[{"ae_title": "PACS", "host": "h", "port": 104},'
        ' {"ae_title": "GSPS_PACS", "host": "h", "port": 105, "outputs": ["sr", "GSPS"]}]',
    )
    plain, with_gsps = load_settings().destinations
    assert plain.outputs == [OutputKind.SR, OutputKind.REPORT, OutputKind.SC]
    assert with_gsps.outputs == [OutputKind.SR, OutputKind.GSPS]
    assert Destination(ae_title="P", host="h", port=1).outputs is not plain.outputs  # no shared default

    cfg = tmp_path / "cxr.toml"
    cfg.write_text('[[destinations]]\nae_title = "PACS"\nhost = "h"\nport = 104\noutputs = ["sc", "gsps"]\n')
    monkeypatch.delenv("CXR_DESTINATIONS")
    assert load_settings(cfg).destinations[0].outputs == [OutputKind.SC, OutputKind.GSPS]


@pytest.mark.parametrize(
    ("outputs", "message"),
    [
        ([], "at least one"),
        (["sr", "pdf"], "unknown outputs ['pdf']: choose from ['sr', 'report', 'sc', 'gsps']"),
        (["sc", "sr", "sc"], "['sc'] more than once"),
        ({"sr": True}, "must be a list"),
    ],
)
def test_bad_destination_outputs_are_refused(outputs: object, message: str) -> None:
    with pytest.raises(ValidationError) as caught:
        Destination.model_validate({"ae_title": "PACS", "host": "h", "port": 104, "outputs": outputs})
    assert message in str(caught.value)


def test_every_setting_is_documented_in_the_readme() -> None:
    from service.core.settings import Settings

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    missing = [name for name in Settings.model_fields if f"`CXR_{name.upper()}`" not in readme]
    assert missing == []
