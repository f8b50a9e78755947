"""From a received dataset to a durable spool file, database rows and an open job for its study."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum

from pydicom import Dataset
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.core.models import Instance, Job, JobEvent, Study
from service.core.settings import Settings
from service.core.status import JobStatus
from service.scp import spool

log = logging.getLogger(__name__)


class StoreStatus(IntEnum):
    """C-STORE response statuses we use (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    SOP_CLASS_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC210


@dataclass(frozen=True)
class Received:
    """What the handler hands to intake: the encoded file and the few header values we index."""

    encoded: bytes
    dataset: Dataset
    command_sop_class_uid: str
    command_sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)[:limit]


class Intake:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self._settings = settings
        self._sessions = sessions

    def store(self, rx: Received) -> StoreStatus:
        ds = rx.dataset
        sop_class = _text(ds, "SOPClassUID", 64)
        sop_instance = _text(ds, "SOPInstanceUID", 64)
        study_uid = _text(ds, "StudyInstanceUID", 64)
        if not (sop_class and sop_instance and study_uid):
            log.warning("store refused: missing UIDs calling_ae=%s", rx.calling_ae_title)
            return StoreStatus.CANNOT_UNDERSTAND
        if sop_class != rx.command_sop_class_uid or sop_instance != rx.command_sop_instance_uid:
            log.warning("store refused: dataset/command UID mismatch calling_ae=%s", rx.calling_ae_title)
            return StoreStatus.SOP_CLASS_MISMATCH

        rel = spool.relative_path(study_uid, sop_instance)
        digest = spool.sha256_hex(rx.encoded)
        try:
            with self._sessions() as session:
                existing = session.scalar(select(Instance).where(Instance.sop_instance_uid == sop_instance))
                if existing is not None:
                    if existing.sha256 != digest:
                        # Keep the first copy: a PACS resending altered content under the same UID is a
                        # conflict for a human, not something to overwrite silently.
                        log.warning(
                            "duplicate SOP instance with different content kept first: study_id=%s",
                            existing.study_id,
                        )
                    return StoreStatus.SUCCESS
        except SQLAlchemyError:
            log.exception("database unavailable during store")
            return StoreStatus.OUT_OF_RESOURCES

        try:
            spool.write_durably(self._settings.spool_dir, rel, rx.encoded)
        except OSError:
            log.exception("spool write failed")
            return StoreStatus.OUT_OF_RESOURCES

        for attempt in range(3):
            try:
                job_id = self._record(ds, rx, study_uid, sop_class, sop_instance, rel, digest)
            except IntegrityError:
                # Another association created the same study or instance concurrently: retry once it's there.
                if attempt == 2:
                    log.exception("could not record instance after retries")
                    return StoreStatus.OUT_OF_RESOURCES
                continue
            except SQLAlchemyError:
                log.exception("database unavailable during store")
                return StoreStatus.OUT_OF_RESOURCES
            log.info("stored instance job=%s calling_ae=%s", job_id, rx.calling_ae_title)
            return StoreStatus.SUCCESS
        return StoreStatus.OUT_OF_RESOURCES  # pragma: no cover - loop always returns

    def _record(
        self,
        ds: Dataset,
        rx: Received,
        study_uid: str,
        sop_class: str,
        sop_instance: str,
        rel: object,
        digest: str,
    ) -> str:
        now = datetime.now(UTC)
        with self._sessions.begin() as session:
            if session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance)):
                job = self._open_job(session, study_uid)
                return job.id if job else "-"
            study = session.scalar(select(Study).where(Study.study_instance_uid == study_uid))
            if study is None:
                study = Study(
                    study_instance_uid=study_uid,
                    patient_id=_text(ds, "PatientID", 64),
                    patient_name=_text(ds, "PatientName", 324),
                    accession_number=_text(ds, "AccessionNumber", 16),
                )
                session.add(study)
                session.flush()
            study.last_received_at = now
            session.add(
                Instance(
                    study_id=study.id,
                    sop_instance_uid=sop_instance,
                    sop_class_uid=sop_class,
                    series_instance_uid=_text(ds, "SeriesInstanceUID", 64),
                    transfer_syntax_uid=rx.transfer_syntax_uid,
                    modality=_text(ds, "Modality", 16),
                    spool_path=str(rel),
                    size_bytes=len(rx.encoded),
                    sha256=digest,
                    calling_ae_title=rx.calling_ae_title[:16],
                    received_at=now,
                )
            )
            job = self._open_job(session, study_uid)
            if job is None:
                job = Job(
                    study_id=study.id,
                    status=JobStatus.RECEIVED,
                    calling_ae_title=rx.calling_ae_title[:16],
                    received_at=now,
                    created_at=now,
                )
                session.add(job)
                session.flush()
                session.add(JobEvent(job_id=job.id, status=JobStatus.RECEIVED, at=now))
            return job.id

    @staticmethod
    def _open_job(session: Session, study_uid: str) -> Job | None:
        return session.scalar(
            select(Job)
            .join(Study)
            .where(Study.study_instance_uid == study_uid, Job.status == JobStatus.RECEIVED)
            .order_by(Job.created_at.desc())
            .limit(1)
        )
