"""Migration 0003 creates the audit_log table exactly as the model describes it."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from service.core.models import Base
from service.core.settings import Settings


def test_audit_log_migration_matches_the_model(settings: Settings) -> None:
    engine = create_engine(settings.effective_database_url)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    about_audit = [d for d in diff if "audit_log" in repr(d)]
    assert about_audit == []
