"""Which findings of a job's result are urgent, and the notification rows they make (one per rule and
channel), written in the transaction that records the result: durable before anything is sent."""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.core.models import Job, Notification
from service.core.notifications import NotificationStatus
from service.core.settings import Settings
from service.core.status import JobStatus, Mode
from service.notify.config import NotifyRule

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Hit:
    rule: NotifyRule
    finding: dict[str, Any]  # label, score, score_kind, min_score, sop_instance_uid, bundle name/version


def evaluate(rules: list[NotifyRule], result: dict[str, Any]) -> list[Hit]:
    """Each rule that fires on the result, with the image where its finding scored highest."""
    images = result.get("images") or []
    bundle = result.get("bundle") or {}
    hits: list[Hit] = []
    for rule in rules:
        best: dict[str, Any] | None = None
        for image in images:
            score = (image.get("probabilities") or {}).get(rule.finding)
            if score is None:
                continue
            fires = (
                rule.finding in (image.get("present") or [])
                if rule.min_score is None
                else score >= rule.min_score
            )
            if fires and (best is None or score > best["score"]):
                best = {
                    "label": rule.finding,
                    "score": float(score),
                    "score_kind": str(image.get("score_kind") or "score"),
                    "min_score": rule.min_score,
                    "sop_instance_uid": str(image.get("sop_instance_uid") or ""),
                    "bundle_name": str(bundle.get("name") or ""),
                    "bundle_version": str(bundle.get("version") or ""),
                }
        if best is not None:
            hits.append(Hit(rule, best))
    return hits


def digest(finding: dict[str, Any]) -> str:
    """What makes a result "the same" for a notification: the finding, its image, the bundle and the
    score to two decimals (a re-run on another device may differ in the last digits)."""
    key = {
        "label": finding["label"],
        "image": finding["sop_instance_uid"],
        "bundle": [finding["bundle_name"], finding["bundle_version"]],
        "score": f"{finding['score']:.2f}",
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def create_for_job(
    session: Session, job_id: str, settings: Settings, now: datetime | None = None
) -> list[int]:
    """Notification rows for the job's urgent findings (in the caller's transaction); returns the new ids.

    Idempotent: a row that exists for the same job, rule, channel and result is left alone, so a re-run
    with the same result notifies nobody again; a changed result adds a row with the next revision.
    Call it where the job becomes done: only the run that finishes the job gets there, so two runs of
    one job never insert side by side.
    """
    if not settings.notify_rules or not settings.notify_channels or settings.mode == Mode.SHADOW:
        return []  # a site trying the model silently (CXR_MODE=shadow) pages nobody
    # Columns, not the ORM object: the caller's transition is an UPDATE the identity map has not seen.
    row = session.execute(select(Job.status, Job.result).where(Job.id == job_id)).one_or_none()
    if row is None or row.status != JobStatus.DONE or not row.result:
        return []
    now = now or datetime.now(UTC)
    channels = {c.name: c for c in settings.notify_channels}
    created: list[int] = []
    for hit in evaluate(settings.notify_rules, row.result):
        key = digest(hit.finding)
        for name in hit.rule.channels or list(channels):
            same = (
                Notification.job_id == job_id,
                Notification.rule == hit.rule.name,
                Notification.channel == name,
            )
            if session.scalar(select(Notification.id).where(*same, Notification.result_digest == key)):
                continue
            revision = session.scalar(select(func.count()).select_from(Notification).where(*same)) or 0
            new = Notification(
                job_id=job_id,
                rule=hit.rule.name,
                channel=name,
                kind=channels[name].type,
                priority=hit.rule.priority.value,
                finding=hit.finding,
                result_digest=key,
                revision=revision,
                status=NotificationStatus.PENDING,
                next_attempt_at=now,  # due now: the listener's scheduler sends it
                created_at=now,
                updated_at=now,
            )
            session.add(new)
            session.flush()
            created.append(new.id)
    if created:
        log.info("job=%s notifications created=%d", job_id, len(created))
    return created
