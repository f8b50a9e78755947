"""Deterministic output UIDs: a re-run replaces rather than duplicates."""

from __future__ import annotations

import pytest
from pydicom.uid import UID

from worker.dicom.uids import derive_uid

PREFIX = "1.2.826.0.1.3680043.10.1453."
SOURCE = "1.3.6.1.4.1.5962.1.1.9.1.1.20040826185059.5457"


def test_same_parts_same_uid() -> None:
    assert derive_uid(PREFIX, SOURCE, "1.0.0", "sr") == derive_uid(PREFIX, SOURCE, "1.0.0", "sr")


@pytest.mark.parametrize(
    "parts",
    [
        (SOURCE, "1.0.0", "sc"),
        (SOURCE, "1.0.1", "sr"),
        (SOURCE + "1", "1.0.0", "sr"),
        (SOURCE, "1.0.0", "sr-series"),
    ],
)
def test_any_part_changes_the_uid(parts: tuple[str, ...]) -> None:
    assert derive_uid(PREFIX, *parts) != derive_uid(PREFIX, SOURCE, "1.0.0", "sr")


def test_part_boundaries_matter() -> None:
    # pydicom joins entropy sources without a separator; ours must not collide on re-splitting.
    assert derive_uid(PREFIX, "ab", "c") != derive_uid(PREFIX, "a", "bc")
    assert derive_uid(PREFIX, "abc") != derive_uid(PREFIX, "ab", "c")


def test_uid_is_valid_and_keeps_the_prefix() -> None:
    uid = derive_uid(PREFIX, SOURCE, "1.0.0", "sr")
    assert isinstance(uid, UID)
    assert uid.startswith(PREFIX)
    assert uid.is_valid
    assert len(uid) <= 64


def test_needs_parts_and_a_valid_prefix() -> None:
    with pytest.raises(ValueError):
        derive_uid(PREFIX)
    with pytest.raises(ValueError):
        derive_uid("not-a-prefix", SOURCE)
