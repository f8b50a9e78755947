from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import pytest

from service.core.settings import load_settings
from service.listener_main import STALE_STAGING_SECONDS, _prepare_staging


def test_staging_is_per_process_and_sweeps_only_stale_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # restored after the test
    settings = load_settings(data_dir=tmp_path)
    other = settings.spool_dir / ".incoming" / "other-host-1"
    other.mkdir(parents=True)
    live, stale = other / "live.dcm", other / "stale.dcm"
    live.write_bytes(b"x")
    stale.write_bytes(b"x")
    old = time.time() - STALE_STAGING_SECONDS - 60
    os.utime(stale, (old, old))
    # An empty folder of another host may be an idle live listener there: it is kept.
    idle = settings.spool_dir / ".incoming" / "elsewhere-2"
    idle.mkdir()

    staging = _prepare_staging(settings)
    assert staging.parent == settings.spool_dir / ".incoming" and staging != other
    assert tempfile.gettempdir() == str(staging)
    assert live.exists(), "another replica's transfer in progress is left alone"
    assert not stale.exists() and idle.exists()
