from __future__ import annotations

from pathlib import Path

import pytest

from service.scp import spool


def test_paths_never_contain_raw_uids() -> None:
    rel = spool.relative_path("../../etc/passwd", "1.2.3/../../x")
    assert ".." not in rel.parts
    assert "passwd" not in str(rel)
    assert rel.suffix == ".dcm"


def test_paths_are_stable_and_distinct() -> None:
    assert spool.relative_path("1.2", "1.2.3") == spool.relative_path("1.2", "1.2.3")
    assert spool.relative_path("1.2", "1.2.3") != spool.relative_path("1.2", "1.2.4")


def test_content_addressed_names_keep_different_copies_apart() -> None:
    a = spool.relative_path("1.2", "1.2.3", "a" * 64)
    b = spool.relative_path("1.2", "1.2.3", "b" * 64)
    assert a != b and a.parent == b.parent
    assert spool.relative_path("1.2", "1.2.3", "a" * 64) == a


def test_adopt_moves_the_received_file_durably(tmp_path: Path) -> None:
    received = tmp_path / "incoming.dcm"
    received.write_bytes(b"DICM" * 100)
    rel = spool.relative_path("1.2", "1.2.3", "c" * 64)
    target = spool.adopt_durably(tmp_path / "spool", rel, received)
    assert target.read_bytes() == b"DICM" * 100
    assert not received.exists()


def test_adopt_copies_across_file_systems(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import os

    real_replace = os.replace
    calls: list[str] = []

    def replace(src: object, dst: object) -> None:
        calls.append(str(src))
        if len(calls) == 1:
            raise OSError(errno.EXDEV, "cross-device link")
        real_replace(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "replace", replace)
    received = tmp_path / "other-fs.dcm"
    received.write_bytes(b"x" * 3_000_000)
    target = spool.adopt_durably(tmp_path / "spool", spool.relative_path("1.2", "1.2.4"), received)
    assert target.read_bytes() == b"x" * 3_000_000
    assert not received.exists()
    assert [p.name for p in target.parent.iterdir()] == [target.name]
