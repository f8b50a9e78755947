"""The Alembic revisions build exactly the schema the models describe (SQLite here, PostgreSQL in e2e)."""

from __future__ import annotations

from pathlib import Path

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
