"""Durable spool: every acknowledged instance is a fsynced file whose name reveals no UID."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def _key(uid: str) -> str:
    # UIDs come from the network: hash them so no peer-chosen string reaches the file system.
    return hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()


def relative_path(study_uid: str, sop_instance_uid: str, digest: str | None = None) -> Path:
    """Where an instance lives under the spool; with ``digest`` the name also says which content.

    Content-addressed names mean a copy that differs from the acknowledged one (a conflict, or a race
    between two associations) lands beside it and never replaces it.
    """
    study = _key(study_uid)
    name = _key(sop_instance_uid) if digest is None else f"{_key(sop_instance_uid)}.{digest[:16]}"
    return Path(study[:2]) / study / f"{name}.dcm"


def sha256_file(path: Path) -> str:
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _make_dirs_durably(path: Path) -> None:
    # A new directory's own entry lives in its parent: fsync that too, or a crash can lose the whole study.
    missing: list[Path] = []
    probe = path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    path.mkdir(parents=True, exist_ok=True)
    for created in reversed(missing):
        fsync_path(created.parent)


def fsync_path(path: Path) -> None:
    """fsync a file's data, or a directory's entries (a rename is durable once its directory is)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def adopt_durably(root: Path, rel: Path, source: Path, *, data_synced: bool = False) -> Path:
    """Move the received file ``source`` to ``root/rel``: data fsynced, atomic rename, directory fsynced.

    The bytes are never rewritten on the same file system (pynetdicom already wrote them once); across file
    systems they are copied to a temporary name in the target directory first, then renamed.
    ``data_synced``: the caller already fsynced ``source`` (e.g. while it was hashing it).
    """
    target = root / rel
    _make_dirs_durably(target.parent)
    if not data_synced:
        fsync_path(source)
    try:
        os.replace(source, target)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out, source.open("rb") as src:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        source.unlink(missing_ok=True)
    fsync_path(target.parent)
    return target


def free_space(path: Path) -> tuple[int, float]:
    """Bytes available to us on the file system holding ``path``, and that as a percentage of its size."""
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    return free, (100.0 * free / total) if total else 0.0
