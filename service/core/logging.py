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


# Libraries that narrate their own start-up and shutdown at INFO (Alembic's plugin set-up and migration
# steps, uvicorn's "Started server process", Celery's "Connected to ..." and "... ready."): the gateway's own
# lines say what matters. Their warnings and errors still show; ``verbose`` (``--verbose`` on ``serve``,
# ``worker`` and ``dashboard``) lets their INFO lines through as well.
CHATTY_LIBRARIES = ("alembic", "uvicorn.error", "celery.apps.worker", "celery.worker.consumer")


def setup_logging(level: str = "INFO", *, verbose: bool = False) -> None:
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
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.NOTSET if verbose else logging.WARNING)
