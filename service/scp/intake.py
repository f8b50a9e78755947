"""From a received Part 10 file to a durable spool file, database rows and an open job for its study.

The C-STORE answer is 0x0000 only once the file is fsynced in the spool and its row committed; anything
that stops that answers a failure the PACS understands (0xA700: try again later; 0xA900/0xC210: this
object is wrong) and leaves nothing half-written in the spool.
"""

from __future__ import annotations

import logging
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path

from pydicom import Dataset, dcmread
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from service.core import jobs
from service.core.models import Instance, InstanceConflict, Job, Study
from service.core.settings import Settings
from service.core.status import JobStatus, ReasonCode
from service.scp import spool
from service.scp.backpressure import BackPressure
from service.scp.safelog import log_failure
from service.scp.structure import check_file

log = logging.getLogger(__name__)

# Header values above this size stay on disk when we read the header (e.g. an encapsulated PDF).
_DEFER_SIZE = 64 * 1024
_UID_PATTERN = re.compile(r"[0-9.]{1,64}")


class StoreStatus(IntEnum):
    """C-STORE response statuses we use (PS3.4 Annex B.2.3)."""

    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700
    SOP_CLASS_MISMATCH = 0xA900
    CANNOT_UNDERSTAND = 0xC210


@dataclass(frozen=True)
class Received:
    """What the handler hands to intake: the received file and what the C-STORE command said.

    ``path`` is the Part 10 file as received (pynetdicom's chunked temp file). Intake moves it into the
    spool when it accepts it and otherwise leaves it where it is for the caller to delete.
    """

    path: Path
    command_sop_class_uid: str
    command_sop_instance_uid: str
    transfer_syntax_uid: str
    calling_ae_title: str


@dataclass(frozen=True)
class Outcome:
    status: StoreStatus
    reason: ReasonCode | None = None
    study_id: int | None = None
    job_id: str | None = None


@dataclass(frozen=True)
class _Header:
    sop_class: str
    sop_instance: str
    study_uid: str
    series_uid: str | None
    modality: str | None
    patient_id: str | None
    patient_name: str | None
    accession: str | None


def _text(ds: Dataset, keyword: str, limit: int) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value).strip()[:limit] or None


def _uid(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    return str(value).strip("\x00 ") or None


def _read_header(path: Path) -> _Header | ReasonCode:
    """The few values we index, or why the object cannot be indexed."""
    ds = dcmread(path, stop_before_pixels=True, defer_size=_DEFER_SIZE)
    sop_class = _uid(ds, "SOPClassUID")
    sop_instance = _uid(ds, "SOPInstanceUID")
    study_uid = _uid(ds, "StudyInstanceUID")
    if not (sop_class and sop_instance and study_uid):
        return ReasonCode.MISSING_UIDS
    # Longer than 64 would be cut by the columns (two UIDs could collide); other characters are no UID.
    if not all(_UID_PATTERN.fullmatch(uid) for uid in (sop_class, sop_instance, study_uid)):
        return ReasonCode.INVALID_UIDS
    return _Header(
        sop_class=sop_class,
        sop_instance=sop_instance,
        study_uid=study_uid,
        series_uid=_text(ds, "SeriesInstanceUID", 64),
        modality=_text(ds, "Modality", 16),
        patient_id=_text(ds, "PatientID", 64),
        patient_name=_text(ds, "PatientName", 324),
        accession=_text(ds, "AccessionNumber", 16),
    )


class _Known:
    """Result of looking the SOP Instance UID up: not there, the same bytes, or different bytes."""

    def __init__(self, instance_id: int | None, study_id: int | None, same: bool) -> None:
        self.instance_id = instance_id
        self.study_id = study_id
        self.same = same


class Intake:
    def __init__(
        self, settings: Settings, sessions: sessionmaker[Session], pressure: BackPressure | None = None
    ) -> None:
        self._settings = settings
        self._sessions = sessions
        self.pressure = pressure or BackPressure(settings)
        self._io = ThreadPoolExecutor(max(2, settings.max_associations), thread_name_prefix="fsync")
        self._stripes = [threading.Lock() for _ in range(64)]

    def close(self) -> None:
        self._io.shutdown(wait=False)

    def store(self, rx: Received) -> Outcome:
        ae = rx.calling_ae_title
        size = rx.path.stat().st_size
        if size > self._settings.max_instance_bytes:
            # The PDU guard aborts a transfer at this size; a file that got here otherwise is refused too.
            return self._refuse(StoreStatus.OUT_OF_RESOURCES, ReasonCode.INSTANCE_TOO_LARGE, ae)
        refusal = self.pressure.refusal(size)
        if refusal is not None:
            return self._refuse(StoreStatus.OUT_OF_RESOURCES, refusal, ae)
        try:
            check_file(rx.path)
            header = _read_header(rx.path)
        except Exception:  # MalformedDataset, and pydicom raises many types on garbage
            return self._refuse(StoreStatus.CANNOT_UNDERSTAND, ReasonCode.DATASET_MALFORMED, ae)
        if isinstance(header, ReasonCode):
            return self._refuse(StoreStatus.CANNOT_UNDERSTAND, header, ae)
        if (header.sop_class, header.sop_instance) != (rx.command_sop_class_uid, rx.command_sop_instance_uid):
            return self._refuse(StoreStatus.SOP_CLASS_MISMATCH, ReasonCode.UID_MISMATCH, ae)

        # The file's data goes to disk while we hash it (both release the GIL): most of an instance's
        # time in here is these two.
        synced = self._io.submit(spool.fsync_path, rx.path)
        digest = spool.sha256_file(rx.path)
        try:
            known = self._lookup(header.sop_instance, digest)
            if known.instance_id is not None:
                return self._known(known, rx, digest, size)
        except SQLAlchemyError as exc:
            return self._database_down(exc, ae)

        rel = spool.relative_path(header.study_uid, header.sop_instance, digest)
        # One store per SOP instance at a time in this process: two identical copies share ``rel``, and one
        # must not remove the file the other just had acknowledged.
        with self._stripes[hash(header.sop_instance) % len(self._stripes)]:
            return self._adopt_and_record(header, rx, rel, digest, size, synced)

    def _adopt_and_record(
        self, header: _Header, rx: Received, rel: Path, digest: str, size: int, synced: Future[None]
    ) -> Outcome:
        ae = rx.calling_ae_title
        try:
            synced.result()
            spool.adopt_durably(self._settings.spool_dir, rel, rx.path, data_synced=True)
        except OSError as exc:
            log_failure(
                log, "spool write failed reason=%s calling_ae=%s", exc, ReasonCode.SPOOL_WRITE_FAILED, ae
            )
            return Outcome(StoreStatus.OUT_OF_RESOURCES, ReasonCode.SPOOL_WRITE_FAILED)

        for attempt in range(3):
            try:
                result = self._record(header, rx, rel, digest, size)
            except IntegrityError as exc:
                # Another association created the same study or instance meanwhile: look again.
                if attempt == 2:
                    log_failure(log, "could not record instance after retries calling_ae=%s", exc, ae)
                    break
                continue
            except SQLAlchemyError as exc:
                self._database_down(exc, ae)
                break
            if isinstance(result, Outcome):
                return result
            if not result.same:
                # Ours lost a race and differs: the row (unique per UID) names another file; ours is nobody's.
                (self._settings.spool_dir / rel).unlink(missing_ok=True)
            return self._known(result, rx, digest, size)
        self._discard_unacknowledged(header.sop_instance, digest, rel)
        return Outcome(StoreStatus.OUT_OF_RESOURCES, ReasonCode.DATABASE_UNAVAILABLE)

    def _discard_unacknowledged(self, sop_instance: str, digest: str, rel: Path) -> None:
        """Remove our spooled file after a failed commit, unless a row (another process) now names it.

        When the database cannot say, the file stays: complete and fsynced but unreferenced it is harmless,
        and the PACS's retry adopts the same content-addressed name. Deleting a file someone else had
        acknowledged would not be.
        """
        try:
            known = self._lookup(sop_instance, digest)
        except SQLAlchemyError:
            return
        if not known.same:
            (self._settings.spool_dir / rel).unlink(missing_ok=True)

    # ------------------------------------------------------------------------------------------ helpers

    @staticmethod
    def _database_down(exc: SQLAlchemyError, calling_ae: str) -> Outcome:
        # Never log.exception here: SQLAlchemy's message carries the statement's parameters (PHI).
        reason = ReasonCode.DATABASE_UNAVAILABLE
        log_failure(log, "store refused status=0xA700 reason=%s calling_ae=%s", exc, reason, calling_ae)
        return Outcome(StoreStatus.OUT_OF_RESOURCES, reason)

    @staticmethod
    def _refuse(status: StoreStatus, reason: ReasonCode, calling_ae: str) -> Outcome:
        log.warning("store refused status=0x%04X reason=%s calling_ae=%s", status, reason, calling_ae)
        return Outcome(status, reason)

    def _lookup(self, sop_instance: str, digest: str) -> _Known:
        with self._sessions() as session:
            row = session.execute(
                select(Instance.id, Instance.study_id, Instance.sha256).where(
                    Instance.sop_instance_uid == sop_instance
                )
            ).first()
        if row is None:
            return _Known(None, None, False)
        return _Known(row.id, row.study_id, row.sha256 == digest)

    def _known(self, known: _Known, rx: Received, digest: str, size: int) -> Outcome:
        """Answer a re-send: identical → success, nothing new; different → keep the first, record it."""
        if known.same:
            log.info("duplicate instance ignored calling_ae=%s", rx.calling_ae_title)
            return Outcome(StoreStatus.SUCCESS, study_id=known.study_id)
        assert known.instance_id is not None
        try:
            self._record_conflict(known.instance_id, rx, digest, size)
        except SQLAlchemyError as exc:
            return self._database_down(exc, rx.calling_ae_title)
        # Success, not a failure: the PACS would otherwise retry forever; a human resolves the conflict.
        log.warning(
            "SOP instance re-sent with other content, first kept reason=%s instance_id=%d calling_ae=%s",
            ReasonCode.DUPLICATE_CONFLICT,
            known.instance_id,
            rx.calling_ae_title,
        )
        return Outcome(StoreStatus.SUCCESS, ReasonCode.DUPLICATE_CONFLICT, study_id=known.study_id)

    def _record_conflict(self, instance_id: int, rx: Received, digest: str, size: int) -> None:
        for attempt in range(2):
            now = datetime.now(UTC)
            try:
                with self._sessions.begin() as session:
                    row = session.scalar(
                        select(InstanceConflict).where(
                            InstanceConflict.instance_id == instance_id, InstanceConflict.sha256 == digest
                        )
                    )
                    if row is None:
                        session.add(
                            InstanceConflict(
                                instance_id=instance_id,
                                sha256=digest,
                                transfer_syntax_uid=rx.transfer_syntax_uid[:64],
                                size_bytes=size,
                                calling_ae_title=rx.calling_ae_title[:16],
                                count=1,
                                first_seen_at=now,
                                last_seen_at=now,
                            )
                        )
                    else:
                        row.count += 1
                        row.last_seen_at = now
                return
            except IntegrityError:
                if attempt == 1:
                    raise

    def _record(self, h: _Header, rx: Received, rel: Path, digest: str, size: int) -> Outcome | _Known:
        """Insert instance (and study, job) rows; a :class:`_Known` if the instance got there first."""
        now = datetime.now(UTC)
        with self._sessions.begin() as session:
            existing = session.execute(
                select(Instance.id, Instance.study_id, Instance.sha256).where(
                    Instance.sop_instance_uid == h.sop_instance
                )
            ).first()
            if existing is not None:
                return _Known(existing.id, existing.study_id, existing.sha256 == digest)
            study = session.scalar(select(Study).where(Study.study_instance_uid == h.study_uid))
            if study is None:
                study = Study(
                    study_instance_uid=h.study_uid,
                    patient_id=h.patient_id,
                    patient_name=h.patient_name,
                    accession_number=h.accession,
                )
                session.add(study)
                session.flush()
            study.last_received_at = now
            session.add(
                Instance(
                    study_id=study.id,
                    sop_instance_uid=h.sop_instance,
                    sop_class_uid=h.sop_class,
                    series_instance_uid=h.series_uid,
                    transfer_syntax_uid=rx.transfer_syntax_uid[:64],
                    modality=h.modality,
                    spool_path=str(rel),
                    size_bytes=size,
                    sha256=digest,
                    calling_ae_title=rx.calling_ae_title[:16],
                    received_at=now,
                )
            )
            job = self._open_job(session, study.id)
            if job is None:
                # No job waiting for this study (none yet, or the last one is queued/running/finished):
                # a new one, so late instances re-run the study rather than vanish.
                job = jobs.create(session, study.id, rx.calling_ae_title[:16], now)
            study_id, job_id = study.id, job.id
        log.info("stored instance job=%s calling_ae=%s", job_id, rx.calling_ae_title)
        return Outcome(StoreStatus.SUCCESS, study_id=study_id, job_id=job_id)

    @staticmethod
    def _open_job(session: Session, study_id: int) -> Job | None:
        return session.scalar(
            select(Job)
            .where(Job.study_id == study_id, Job.status == JobStatus.RECEIVED)
            .order_by(Job.created_at.desc())
            .limit(1)
        )
