"""The Alembic revisions build exactly the schema the models describe (SQLite here, PostgreSQL in e2e)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from service.core.db import migrate
from service.core.models import Base
from service.core.settings import load_settings


def test_migrations_match_the_models(tmp_path: Path) -> None:
    settings = load_settings(data_dir=tmp_path)
    migrate(settings)
    engine = create_engine(settings.effective_database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []


def test_alembic_says_nothing_at_info_unless_verbose(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    migrate(load_settings(data_dir=tmp_path / "quiet"))
    assert [r.getMessage() for r in caplog.records if r.name.startswith("alembic")] == []
    migrate(load_settings(data_dir=tmp_path / "verbose"), verbose=True)
    assert any(r.name.startswith("alembic") and "Running upgrade" in r.getMessage() for r in caplog.records)
