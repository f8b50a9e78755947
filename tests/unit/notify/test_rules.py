"""Urgency rules on a job's result, and the rows they make: one per rule and channel, once per result."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from service.core.models import Job, Notification
from service.notify.config import NotifyRule
from service.notify.rules import create_for_job, evaluate
from tests.unit.notify.conftest import FINISHED, database, done_job, make_settings, result


def test_rules_fire_at_the_operating_point_or_a_score() -> None:
    present = NotifyRule(name="ptx", finding="Pneumothorax")
    above = NotifyRule(name="eff", finding="Effusion", min_score=0.05, priority="routine")
    missing = NotifyRule(name="mass", finding="Mass")
    hits = evaluate([present, above, missing], result())
    assert [(h.rule.name, h.finding["label"], h.finding["score"]) for h in hits] == [
        ("ptx", "Pneumothorax", 0.91),
        ("eff", "Effusion", 0.10),
    ]
    assert evaluate([present], result(present=False)) == []
    assert evaluate([NotifyRule(name="hi", finding="Effusion", min_score=0.5)], result()) == []


def test_rows_are_created_once_per_result_and_again_for_a_changed_one(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    sessions = database(settings)
    job_id = done_job(sessions)
    with sessions.begin() as s:
        first = create_for_job(s, job_id, settings, FINISHED)
    assert len(first) == 3  # one rule × three channels
    with sessions.begin() as s:
        assert create_for_job(s, job_id, settings, FINISHED) == []  # a re-run, same result
        # Another device's last digits: the same result to two decimals.
        s.get(Job, job_id).result = result(score=0.9112)  # type: ignore[union-attr]
        s.flush()
        assert create_for_job(s, job_id, settings, FINISHED) == []
    with sessions() as s:
        rows = s.scalars(select(Notification).order_by(Notification.id)).all()
    assert len(rows) == 3


def test_a_changed_result_is_a_new_revision(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    sessions = database(settings)
    job_id = done_job(sessions)
    with sessions.begin() as s:
        create_for_job(s, job_id, settings, FINISHED)
        s.get(Job, job_id).result = result(version="1.3.0")  # type: ignore[union-attr]
        s.flush()
        again = create_for_job(s, job_id, settings, FINISHED)
    assert len(again) == 3
    with sessions() as s:
        revisions = sorted(r.revision for r in s.scalars(select(Notification)))
        kinds = sorted({r.kind for r in s.scalars(select(Notification))})
    assert revisions == [0, 0, 0, 1, 1, 1]
    assert kinds == ["fhir", "hl7", "webhook"]


def test_no_rule_no_row(tmp_path: Path) -> None:
    settings = make_settings(tmp_path, notify_rules=[])
    sessions = database(settings)
    job_id = done_job(sessions)
    with sessions.begin() as s:
        assert create_for_job(s, job_id, settings, FINISHED) == []
