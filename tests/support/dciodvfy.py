"""Run dicom3tools' dciodvfy (IOD/module/VR validator) on a file and sort its findings.

dciodvfy writes "Error - ..." and "Warning - ..." lines (on stderr); its exit status does not tell errors
from warnings, so callers look at the lines. A missing binary skips the test locally and fails it under CI.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support.peers import tool


def dciodvfy_lines(path: str | Path) -> list[str]:
    """All non-empty output lines of `dciodvfy <path>` (stdout then stderr)."""
    completed = subprocess.run(
        [tool("dciodvfy", "dicom3tools"), str(path)],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=120,
        check=False,
    )
    output = completed.stdout + "\n" + completed.stderr
    return [line.strip() for line in output.splitlines() if line.strip()]


def dciodvfy_errors(path: str | Path) -> list[str]:
    """dciodvfy's "Error" lines for `path` (empty when the object validates)."""
    return [line for line in dciodvfy_lines(path) if line.startswith("Error")]


def dciodvfy_warnings(path: str | Path) -> list[str]:
    return [line for line in dciodvfy_lines(path) if line.startswith("Warning")]
