"""Deterministic UIDs for the objects we create, so that a re-run replaces rather than duplicates.

Key outputs on what identifies them, e.g.::

    derive_uid(prefix, study_uid, bundle_version, "sr-series")
    derive_uid(prefix, source_sop_instance_uid, bundle_version, "sc")
"""

from __future__ import annotations

from pydicom.uid import UID, generate_uid

__all__ = ["derive_uid"]


def derive_uid(prefix: str, *parts: str) -> UID:
    """Return `prefix` + a decimal hash of `parts`; the same parts always give the same UID.

    `prefix` must end with "." and be at most 54 characters (pydicom's limit, leaving room for the
    hash). The UID is at most 64 characters.
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part to key the UID on")
    if any(not isinstance(part, str) for part in parts):
        raise TypeError("derive_uid parts must be str")
    # pydicom concatenates the entropy sources before hashing, so ("ab", "c") and ("a", "bc") would
    # collide; a length prefix on each part makes the encoding unambiguous.
    entropy = [f"{len(part)}:{part}" for part in parts]
    return generate_uid(prefix=prefix, entropy_srcs=entropy)
