"""Retention: a study's spooled images and its jobs' outputs are deleted ``retention_days`` after it
settled, and never before.

A study has settled when every job of it is final and every delivery of those jobs delivered; its age
counts from the last of those moments (a job finishing, a delivery arriving) or the last instance
received, whichever is later. A study with an unfinished job, an open or dead-lettered delivery (a replay
needs the file) or, while ``retention_keep_labelled``, reference labels or reader feedback but no export
for training, keeps its files. The rows stay: ``study_purges`` says when the files went, and the dashboard
shows 'purged' for every job finished before then.

Run by the listener (``Purger``, every ``retention_interval_seconds``) and by ``cxr-gateway purge``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path

from sqlalchemy import case, exists, func, select
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import database_now
from service.core.models import (
    Delivery,
    FindingFeedback,
    Instance,
    Job,
    ReferenceLabel,
    Study,
    StudyExport,
    StudyPurge,
)
from service.core.periodic import Periodic
from service.core.settings import Settings
from service.core.status import FINAL_JOB_STATUSES, DeliveryStatus

log = logging.getLogger(__name__)

AGE_BUCKETS = (("< 1 d", 1.0), ("1–7 d", 7.0), ("7–30 d", 30.0), ("> 30 d", float("inf")))


@dataclass
class PurgeReport:
    """What a pass found and did (``dry_run``: what it would do)."""

    dry_run: bool
    purged: list[int] = field(default_factory=list)  # study ids
    files: int = 0
    bytes: int = 0
    kept_unsettled: int = 0  # an unfinished job, or a delivery not delivered
    kept_labelled: int = 0  # labelled and not exported yet


def _settled_studies(session: Session, cutoff: datetime) -> list[tuple[int, int, bool]]:
    """(study id, deliveries not delivered, has an unfinished job) for studies whose jobs and
    deliveries last changed before ``cutoff`` and that have files left to purge."""
    unfinished = func.sum(case((Job.status.notin_(list(FINAL_JOB_STATUSES)), 1), else_=0))
    jobs = (
        select(Job.study_id, unfinished.label("unfinished"), func.max(Job.finished_at).label("finished"))
        .group_by(Job.study_id)
        .subquery()
    )
    not_delivered = func.sum(case((Delivery.status != DeliveryStatus.DELIVERED, 1), else_=0))
    deliveries = (
        select(
            Job.study_id,
            not_delivered.label("open"),
            func.max(Delivery.delivered_at).label("delivered"),
        )
        .join(Delivery, Delivery.job_id == Job.id)
        .group_by(Job.study_id)
        .subquery()
    )
    rows = session.execute(
        select(
            Study.id,
            Study.last_received_at,
            jobs.c.unfinished,
            jobs.c.finished,
            deliveries.c.open,
            deliveries.c.delivered,
            StudyPurge.purged_at,
        )
        .join(jobs, jobs.c.study_id == Study.id)
        .outerjoin(deliveries, deliveries.c.study_id == Study.id)
        .outerjoin(StudyPurge, StudyPurge.study_id == Study.id)
        .where(Study.last_received_at < cutoff)
    ).all()
    out = []
    for row in rows:
        moments = [t for t in (row.last_received_at, row.finished, row.delivered) if t is not None]
        last = max(moments)
        if last >= cutoff or (row.purged_at is not None and row.purged_at >= last):
            continue  # too recent, or nothing happened since its files went
        out.append((row.id, int(row.open or 0), bool(row.unfinished)))
    return out


def _labelled_unexported(session: Session, study_ids: list[int]) -> set[int]:
    labelled = (
        exists().where(ReferenceLabel.study_id == Study.id)
        | exists().where(FindingFeedback.study_id == Study.id)
    ) & ~exists().where(StudyExport.study_id == Study.id)
    found: set[int] = set()
    for chunk in range(0, len(study_ids), 500):
        ids = study_ids[chunk : chunk + 500]
        found.update(session.scalars(select(Study.id).where(Study.id.in_(ids), labelled)))
    return found


def _inside(root: Path, rel: str) -> Path | None:
    path = (root / rel).resolve()
    return path if path.is_relative_to(root.resolve()) else None


def _study_files(session: Session, settings: Settings, study_id: int) -> tuple[list[Path], list[Path]]:
    """The study's spooled files and its jobs' output folders (those inside their roots)."""
    spooled = session.scalars(select(Instance.spool_path).where(Instance.study_id == study_id))
    job_ids = session.scalars(select(Job.id).where(Job.study_id == study_id))
    files = [p for p in (_inside(settings.spool_dir, r) for r in spooled) if p is not None]
    folders = [p for p in (_inside(settings.output_dir, j) for j in job_ids) if p is not None]
    return files, folders


def _sizes(files: Iterable[Path], folders: Iterable[Path]) -> tuple[int, int]:
    count = size = 0
    for path in [*files, *(p for d in folders if d.is_dir() for p in d.rglob("*"))]:
        try:
            if path.is_file():
                size += path.stat().st_size
                count += 1
        except OSError:
            continue
    return count, size


def _still_due(session: Session, study_id: int) -> bool:
    """Checked again with the study row locked, just before deleting: nothing arrived or reopened."""
    session.scalar(select(Study.id).where(Study.id == study_id).with_for_update())
    open_job = session.scalar(
        select(func.count(Job.id)).where(
            Job.study_id == study_id, Job.status.notin_(list(FINAL_JOB_STATUSES))
        )
    )
    undelivered = session.scalar(
        select(func.count(Delivery.id))
        .join(Job, Job.id == Delivery.job_id)
        .where(Job.study_id == study_id, Delivery.status != DeliveryStatus.DELIVERED)
    )
    return not open_job and not undelivered


def purge(
    sessions: sessionmaker[Session], settings: Settings, now: datetime, *, dry_run: bool = False
) -> PurgeReport:
    """One pass over the studies that are due; each purged in its own transaction."""
    report = PurgeReport(dry_run=dry_run)
    cutoff = now - timedelta(days=settings.retention_days)
    with sessions() as session:
        settled = _settled_studies(session, cutoff)
        labelled = (
            _labelled_unexported(session, [s for s, _, _ in settled])
            if settings.retention_keep_labelled
            else set()
        )
    for study_id, not_delivered, unfinished in settled:
        if not_delivered or unfinished:
            report.kept_unsettled += 1
            continue
        if study_id in labelled:
            report.kept_labelled += 1
            continue
        with sessions.begin() as session:
            if not _still_due(session, study_id):
                report.kept_unsettled += 1
                continue
            files, folders = _study_files(session, settings, study_id)
            count, size = _sizes(files, folders)
            if not dry_run:
                _delete(files, folders)
                row = session.get(StudyPurge, study_id) or StudyPurge(study_id=study_id)
                row.purged_at, row.files, row.bytes = now, count, size
                session.add(row)
        report.purged.append(study_id)
        report.files += count
        report.bytes += size
    if report.purged and not dry_run:
        log.info(
            "retention purged studies=%d files=%d bytes=%d", len(report.purged), report.files, report.bytes
        )
    return report


def _delete(files: list[Path], folders: list[Path]) -> None:
    for path in files:
        path.unlink(missing_ok=True)
    for folder in folders:
        shutil.rmtree(folder, ignore_errors=True)


def purged_at(session: Session, job: Job) -> datetime | None:
    """When the job's files were purged, or None (a job finished after its study's purge has files)."""
    at = session.scalar(select(StudyPurge.purged_at).where(StudyPurge.study_id == job.study_id))
    if at is None or job.finished_at is None or job.finished_at > at:
        return None
    return at


@dataclass
class AgeBucket:
    label: str
    files: int = 0
    bytes: int = 0


def disk_use(settings: Settings, now: datetime) -> dict[str, list[AgeBucket]]:
    """Files and bytes of the spool and of the outputs by age (modification time), in AGE_BUCKETS."""
    out: dict[str, list[AgeBucket]] = {}
    for name, root in (("spool", settings.spool_dir), ("outputs", settings.output_dir)):
        buckets = [AgeBucket(label) for label, _ in AGE_BUCKETS]
        for path in root.rglob("*") if root.is_dir() else []:
            try:
                stat = path.stat()
            except OSError:
                continue
            if not path.is_file():
                continue
            days = (now.timestamp() - stat.st_mtime) / 86400
            bucket = next(b for b, (_, limit) in zip(buckets, AGE_BUCKETS, strict=True) if days < limit)
            bucket.files += 1
            bucket.bytes += stat.st_size
        out[name] = buckets
    return out


class Purger(Periodic):
    """A daemon thread of the listener: :func:`purge` every ``retention_interval_seconds`` (the first pass
    one interval after start). Its clock is the database's."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        super().__init__("retention", settings.retention_interval_seconds)
        self._settings = settings
        self._sessions = sessions

    def tick(self) -> None:
        purge(self._sessions, self._settings, database_now(self._sessions))
