"""The one place that reads pynetdicom internals: the temp files of data sets an association received.

With STORE_RECV_CHUNKED_DATASET pynetdicom streams each C-STORE data set into a NamedTemporaryFile and
deletes it after the EVT_C_STORE handler returned. A file is left behind when the association ends
first: mid data set (an abort, a release, a dropped connection), or with complete messages still
queued for the handler (the association aborted after an earlier message failed). pynetdicom has no
public way to list those files, so this module reads them from its DIMSE provider:

* ``assoc.dimse.message._data_set_file``: the message being received;
* ``assoc.dimse.msg_queue``: complete messages not yet handled, each C-STORE primitive with its
  ``_dataset_file``.

tests/unit/scp/test_pynetdicom_compat.py fails loudly when pynetdicom renames any of these.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

__all__ = ["discard_received_files", "received_files"]


def received_files(assoc: Any) -> list[Path]:
    """Temp files of data sets this association received that no handler has taken yet."""
    dimse = getattr(assoc, "dimse", None)
    files: list[Any] = []
    message = getattr(dimse, "message", None)
    files.append(getattr(message, "_data_set_file", None))
    queue = getattr(dimse, "msg_queue", None)
    pending = list(getattr(queue, "queue", ()))  # a snapshot; the association has ended
    for item in pending:
        primitive = item[1] if isinstance(item, tuple) and len(item) == 2 else None
        files.append(getattr(primitive, "_dataset_file", None))
    return [Path(f.name) for f in files if f is not None and getattr(f, "name", None)]


def discard_received_files(assoc: Any) -> int:
    """Close and delete the files `received_files` names; how many were deleted."""
    deleted = 0
    dimse = getattr(assoc, "dimse", None)
    handles = [getattr(getattr(dimse, "message", None), "_data_set_file", None)]
    handles += [
        getattr(item[1], "_dataset_file", None)
        for item in list(getattr(getattr(dimse, "msg_queue", None), "queue", ()))
        if isinstance(item, tuple) and len(item) == 2
    ]
    for handle in handles:
        if handle is None:
            continue
        with contextlib.suppress(OSError):
            handle.close()
        with contextlib.suppress(OSError):
            os.unlink(handle.name)
            deleted += 1
    return deleted
