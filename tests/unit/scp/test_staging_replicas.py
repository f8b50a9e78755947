"""Listener replicas share the spool: one starting must not remove a live one's staging folder."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from service.core.settings import load_settings
from service.listener_main import _prepare_staging


def test_a_second_listener_keeps_the_first_ones_staging_folder(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    root = settings.spool_dir / ".incoming"
    host = socket.gethostname()
    # A live peer (the test runner's parent stands in for it), a dead one, and another host's.
    live = root / f"{host}-{os.getppid()}"
    dead_pid = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    ).stdout.strip()
    dead = root / f"{host}-{dead_pid}"
    other_host = root / "elsewhere-1"
    for folder in (live, dead, other_host):
        folder.mkdir(parents=True)
    saved = tempfile.tempdir
    try:
        mine = _prepare_staging(settings)
    finally:
        tempfile.tempdir = saved
    assert mine.is_dir() and live.is_dir() and other_host.is_dir()
    assert not dead.exists()
