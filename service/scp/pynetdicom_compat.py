"""The one place that reads pynetdicom internals: the temp files of data sets an association received.

With STORE_RECV_CHUNKED_DATASET pynetdicom streams each C-STORE data set into a NamedTemporaryFile and
deletes it after the EVT_C_STORE handler returned. A file is left behind when the association ends
first: mid data set (an abort, a release, a dropped connection), or with complete messages still
queued for the handler (the association aborted after an earlier message failed). pynetdicom has no
public way to list those files (pynetdicom 3.0), so this module reads them from its DIMSE provider:

* ``assoc.dimse.message._data_set_file``: the message being received;
* ``assoc.dimse.msg_queue``: complete messages not yet handled, each C-STORE primitive with its
  ``_dataset_file``.

tests/unit/scp/test_pynetdicom_compat.py fails loudly when pynetdicom renames any of these; pyproject.toml
pins pynetdicom's minor version for it.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

__all__ = ["discard_received_files", "received_files"]


def _handles(assoc: Any) -> list[Any]:
    """The temp-file handles of the message being received and of the queued C-STORE primitives."""
    dimse = getattr(assoc, "dimse", None)
    handles = [getattr(getattr(dimse, "message", None), "_data_set_file", None)]
    pending = list(getattr(getattr(dimse, "msg_queue", None), "queue", ()))  # a snapshot: it has ended
    handles += [
        getattr(item[1], "_dataset_file", None)
        for item in pending
        if isinstance(item, tuple) and len(item) == 2
    ]
    return [h for h in handles if h is not None and getattr(h, "name", None)]


def received_files(assoc: Any) -> list[Path]:
    """Temp files of data sets this association received that no handler has taken yet."""
    return [Path(handle.name) for handle in _handles(assoc)]


def discard_received_files(assoc: Any) -> int:
    """Close and delete the files `received_files` names; how many were deleted."""
    deleted = 0
    for handle in _handles(assoc):
        with contextlib.suppress(OSError):
            handle.close()
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
            deleted += 1
    return deleted
