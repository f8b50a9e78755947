"""Logging failures without their messages: exception texts can carry patient data.

SQLAlchemy errors embed the statement's parameters (patient names, UIDs), pydicom errors quote element
values. The exception type and the traceback frames (file, line, code) are enough to find a bug.
"""

from __future__ import annotations

import logging
import traceback


def log_failure(logger: logging.Logger, message: str, exc: BaseException, *args: object) -> None:
    frames = "".join(traceback.format_tb(exc.__traceback__))
    logger.error(f"{message} error=%s\n%s", *args, type(exc).__name__, frames.rstrip())
