"""Durable spool: every acknowledged instance is a fsynced file whose name reveals no UID."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


def _key(uid: str) -> str:
    # UIDs come from the network: hash them so no peer-chosen string reaches the file system.
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()


def relative_path(study_uid: str, sop_instance_uid: str) -> Path:
    study = _key(study_uid)
    return Path(study[:2]) / study / f"{_key(sop_instance_uid)}.dcm"


def write_durably(root: Path, rel: Path, data: bytes) -> Path:
    """Write ``data`` to ``root/rel`` atomically and fsync file and directory before returning."""
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(target.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
