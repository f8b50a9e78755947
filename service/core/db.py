"""Engine and session factory, and schema migration through Alembic."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.orm import Session, sessionmaker

from service.core.settings import Settings

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            # WAL lets the listener, worker and dashboard processes read while one writes;
            # synchronous=FULL because a 0x0000 to the PACS promises the row is durable.
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=FULL")
            cur.execute("PRAGMA busy_timeout=30000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=10)


def make_session_factory(settings: Settings) -> sessionmaker[Session]:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.effective_database_url)
    return sessionmaker(engine, expire_on_commit=False)


def database_now(sessions: sessionmaker[Session]) -> datetime:
    """The database server's clock (UTC): one clock for times written by processes on several hosts.

    SQLite runs inside each process on one host, so there it is this host's clock.
    """
    with sessions() as session:
        if session.get_bind().dialect.name == "postgresql":
            value = session.scalar(text("SELECT clock_timestamp()"))
            if value is not None:
                return cast(datetime, value).astimezone(UTC)
    return datetime.now(UTC)


def migrate(settings: Settings, *, verbose: bool = False) -> None:
    """Bring the schema to the newest Alembic revision (idempotent).

    Alembic's INFO lines (its plugin set-up and each step, some 16 at every start) are kept out of the log
    unless ``verbose``; its warnings and errors still show.
    """
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Imported in here: alembic announces its plugins when first imported.
    with _alembic_at(logging.NOTSET if verbose else logging.WARNING):
        from alembic import command
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        cfg.set_main_option("sqlalchemy.url", settings.effective_database_url.replace("%", "%%"))
        command.upgrade(cfg, "head")


@contextmanager
def _alembic_at(level: int) -> Iterator[None]:
    alembic_log = logging.getLogger("alembic")
    before = alembic_log.level
    alembic_log.setLevel(level)
    try:
        yield
    finally:
        alembic_log.setLevel(before)
