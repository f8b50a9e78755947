from __future__ import annotations

from pathlib import Path

from service.scp import spool


def test_paths_never_contain_raw_uids() -> None:
    rel = spool.relative_path("../../etc/passwd", "1.2.3/../../x")
    assert ".." not in rel.parts
    assert "passwd" not in str(rel)
    assert rel.suffix == ".dcm"


def test_paths_are_stable_and_distinct() -> None:
    assert spool.relative_path("1.2", "1.2.3") == spool.relative_path("1.2", "1.2.3")
    assert spool.relative_path("1.2", "1.2.3") != spool.relative_path("1.2", "1.2.4")


def test_write_is_atomic_and_leaves_no_partials(tmp_path: Path) -> None:
    rel = spool.relative_path("1.2", "1.2.3")
    target = spool.write_durably(tmp_path, rel, b"DICM" * 10)
    assert target.read_bytes() == b"DICM" * 10
    assert [p.name for p in target.parent.iterdir()] == [target.name]
