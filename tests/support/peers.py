"""The programs the suite runs as real peers, and its one rule for a missing one: skip the test on a
developer's machine, FAIL it under CI (env CI=true), so a broken CI image never turns into a green run.

``require_peer("dcmtk")`` is the only way a test (or a helper it calls) asks for a peer; the session's
header and closing summary name every missing peer once, with the command that installs them.
``CXR_PEERS_ASSUME_MISSING="dcmtk orthanc"`` treats those Debian packages as missing (as tests/peers.sh
does), to see what a machine without them gets.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import pytest

# The browser the dashboard and viewer tests drive (Debian's: no browser download).
CHROMIUM = "/usr/bin/chromium"


@dataclass(frozen=True)
class Peer:
    package: str  # the Debian package that provides it
    what: str  # what the tests use of it
    present: Callable[[], bool]


def _orthanc() -> bool:
    from tests.support.orthanc import orthanc_binary

    return orthanc_binary() is not None


def _plugin(name: str) -> Callable[[], bool]:
    def present() -> bool:
        from tests.support import orthanc

        return bool(getattr(orthanc, name).is_file())

    return present


def _on_path(*tools: str) -> Callable[[], bool]:
    return lambda: all(shutil.which(tool) for tool in tools)


PEERS: dict[str, Peer] = {
    peer.package: peer
    for peer in (
        Peer("orthanc", "Orthanc, the PACS the gateway receives from and delivers to", _orthanc),
        Peer(
            "dcmtk",
            "DCMTK: storescu and echoscu as modalities, storescp as a peer AE, dsrdump, dcmp2pgm",
            _on_path("storescu", "echoscu"),
        ),
        Peer(
            "orthanc-dicomweb", "Orthanc's DICOMweb plugin, for the viewer tests", _plugin("DICOMWEB_PLUGIN")
        ),
        Peer(
            "orthanc-webviewer",
            "Orthanc's Web Viewer plugin, for the viewer tests",
            _plugin("WEBVIEWER_PLUGIN"),
        ),
        Peer("chromium", "Chromium, for the dashboard and viewer tests", lambda: Path(CHROMIUM).exists()),
        Peer("dicom3tools", "dicom3tools' dciodvfy, the IOD validator", _on_path("dciodvfy")),
        Peer("redis-server", "a private redis-server to kill", _on_path("redis-server")),
        Peer("openssl", "the openssl CLI, for a throw-away PKI", _on_path("openssl")),
    )
}

INSTALL = "sudo apt-get install -y --no-install-recommends"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def unavailable(message: str) -> NoReturn:
    """Skip locally, fail in CI."""
    if in_ci():
        pytest.fail(f"{message} (CI=true: missing infrastructure is an error)", pytrace=False)
    pytest.skip(message)


def _assumed_missing() -> set[str]:
    return set(os.environ.get("CXR_PEERS_ASSUME_MISSING", "").split())


def is_present(name: str) -> bool:
    return name not in _assumed_missing() and PEERS[name].present()


def missing_peers() -> list[str]:
    return [name for name in PEERS if not is_present(name)]


def install_hint(names: list[str]) -> str:
    return f"{INSTALL} {' '.join(PEERS[n].package for n in names)}  (or `make test`, which installs them)"


def require_peer(*names: str) -> None:
    """Skip (locally) or fail (CI) the calling test unless every named peer is present."""
    missing = [name for name in names if not is_present(name)]
    if missing:
        unavailable(f"missing peer(s) {', '.join(missing)}: {install_hint(missing)}")


def tool(name: str, peer: str) -> str:
    """The path of one program of a peer, through the same rule."""
    require_peer(peer)
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not on PATH though {peer} looks installed: {install_hint([peer])}")
    return path
