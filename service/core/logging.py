"""Logging set-up with a guard that keeps DICOM person names and identifiers out of log lines."""

from __future__ import annotations

import logging
import re

# DICOM PN values look like "FAMILY^GIVEN"; a caret inside a log line is almost always a leaked name.
_PN_PATTERN = re.compile(r"[^\s'\"=,]*\^[^\s'\"=,]*")


class PhiFilter(logging.Filter):
    """Last line of defence: code logs job ids and AE titles only; this masks what slips through."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        if "^" in msg:
            record.msg = _PN_PATTERN.sub("<redacted>", msg)
            record.args = None
        return True


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    handler.addFilter(PhiFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # pynetdicom logs every PDU at INFO, including identifiers from the dataset: keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom logs source UIDs at INFO while it copies modules between datasets.
    logging.getLogger("highdicom").setLevel(logging.WARNING)
    # Alembic logs its plugin set-up and every migration step at INFO on each start: not ours to print.
    logging.getLogger("alembic").setLevel(logging.WARNING)
