"""The metrics collector's SQL on the production database: stage times and pass sizes from PostgreSQL."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from service.admin.metrics import GatewayCollector
from service.core.db import make_session_factory, migrate
from service.core.models import Job, Study
from service.core.settings import load_settings
from service.core.status import JobStatus


def test_pass_sizes_and_stage_times_come_out_of_postgresql(tmp_path: Path, postgres_url: str) -> None:
    settings = load_settings(data_dir=tmp_path, database_url=postgres_url)
    migrate(settings)
    sessions = make_session_factory(settings)
    t0 = datetime(2026, 1, 1, 8, 0, tzinfo=UTC)
    with sessions.begin() as s:
        study = Study(study_instance_uid="1.2.3")
        s.add(study)
        s.flush()
        results = [{"inference": {"batch_images": 12, "batch_studies": 7}}, {"images": []}, None]
        for n, result in enumerate(results):
            s.add(
                Job(
                    study_id=study.id,
                    status=JobStatus.DONE,
                    received_at=t0,
                    finished_at=t0 + timedelta(seconds=3 + n),
                    result=result,
                )
            )
    collector = GatewayCollector(settings, sessions, celery=None)  # type: ignore[arg-type]
    with sessions() as s:
        collector._update_stages(s)
    assert collector._batch.total == 12.0 and sum(collector._batch.counts) == 1  # only the job that has one
    assert sum(collector._hist["total"].counts) == 3
    assert collector._hist["total"].total == 3 + 4 + 5
    sessions.kw["bind"].dispose()
