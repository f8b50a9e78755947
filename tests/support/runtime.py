"""A worker runtime for tests that run the study pipeline in-process (tests/integration, tests/hostile)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from service.core.db import make_session_factory, migrate
from service.core.settings import Destination, load_settings
from worker.runtime import Runtime

# A DICOM destination nobody listens on: delivery rows are made, attempts are not made in-process.
PACS = Destination(ae_title="PACS", host="127.0.0.1", port=104)


@contextmanager
def worker_runtime(data_dir: Path, **overrides: Any) -> Iterator[Runtime]:
    """A Runtime on a fresh SQLite database under ``data_dir`` (destinations: PACS unless given); its
    decoder processes closed on exit."""
    overrides.setdefault("destinations", [PACS])
    settings = load_settings(data_dir=data_dir, **overrides)
    migrate(settings)
    rt = Runtime(settings=settings, sessions=make_session_factory(settings))
    try:
        yield rt
    finally:
        rt.close()
