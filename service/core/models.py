"""Database models: the database, not the broker, is the source of truth for every job."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, ClassVar

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Dialect,
    ForeignKey,
    Integer,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from service.core.status import DeliveryStatus, JobStatus


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class UTCDateTime(TypeDecorator[datetime]):
    """Aware UTC datetimes on every backend (SQLite would otherwise hand back naive ones)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    type_annotation_map: ClassVar[dict[Any, Any]] = {dict[str, Any]: JSON, datetime: UTCDateTime()}


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    # PHI lives only here (and in the spooled files); it is never logged or put in URLs.
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_received_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)

    instances: Mapped[list[Instance]] = relationship(back_populates="study", order_by="Instance.id")
    jobs: Mapped[list[Job]] = relationship(back_populates="study", order_by="Job.created_at")


class Instance(Base):
    __tablename__ = "instances"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64), unique=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    series_instance_uid: Mapped[str | None] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    modality: Mapped[str | None] = mapped_column(String(16))
    spool_path: Mapped[str] = mapped_column(Text)  # relative to the spool dir
    size_bytes: Mapped[int] = mapped_column(Integer)
    sha256: Mapped[str] = mapped_column(String(64))
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    received_at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="instances")


class Job(Base):
    __tablename__ = "jobs"

    id: Mapped[str] = mapped_column(String(32), primary_key=True, default=new_id)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.RECEIVED, index=True)
    reason_code: Mapped[str | None] = mapped_column(String(40))
    reason_detail: Mapped[str | None] = mapped_column(Text)
    calling_ae_title: Mapped[str | None] = mapped_column(String(16))
    bundle_version: Mapped[str | None] = mapped_column(String(64))
    # live: some destination received its outputs; shadow: none did (service.core.status.Mode). Set when
    # the worker settles the job; None before.
    mode: Mapped[str | None] = mapped_column(String(8))
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    # The Celery node that claimed the job last (a ``workers`` row): a lapsed heartbeat there means the
    # job's worker died, and the reconciler need not wait for the running deadline.
    worker: Mapped[str | None] = mapped_column(String(255), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None]
    started_at: Mapped[datetime | None] = mapped_column(index=True)  # the reconciler's queue frontier
    finished_at: Mapped[datetime | None]

    study: Mapped[Study] = relationship(back_populates="jobs")
    events: Mapped[list[JobEvent]] = relationship(back_populates="job", order_by="JobEvent.id")
    deliveries: Mapped[list[Delivery]] = relationship(back_populates="job", order_by="Delivery.id")


class JobEvent(Base):
    """Every status transition with its time: stage latencies come from these rows."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    status: Mapped[str] = mapped_column(String(16))
    reason_code: Mapped[str | None] = mapped_column(String(40))
    at: Mapped[datetime] = mapped_column(default=utcnow)

    job: Mapped[Job] = relationship(back_populates="events")


class DueTimeColumns:
    """An outbox row's own retry clock (deliveries, notifications; service.core.outbox).

    Retries are owned by the row, not by a task sleeping in a worker or the broker: while it is open,
    ``next_attempt_at`` is when it is due (or a sending row's lease ends), and ``dispatched_at`` when its
    message for that due time went to the broker (None: not yet). A message that never led to an attempt
    (the broker or the worker holding it died) is sent again once it is older than a reconcile interval.
    """

    next_attempt_at: Mapped[datetime | None] = mapped_column(index=True)
    dispatched_at: Mapped[datetime | None]


class AttemptColumns:
    """One try of an outbox row: when, how long, and what came of it."""

    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime] = mapped_column(default=utcnow)
    outcome: Mapped[str] = mapped_column(String(16))  # the row's status after this try
    # What the peer or the network said (DIMSE status, refusal, connection error): never patient data.
    error: Mapped[str | None] = mapped_column(Text)


class Delivery(DueTimeColumns, Base):
    """One output object to one destination."""

    __tablename__ = "deliveries"
    __table_args__ = (UniqueConstraint("job_id", "sop_instance_uid", "ae_title", "host", "port"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(8))  # "sr" | "sc"
    output_path: Mapped[str] = mapped_column(Text)  # relative to the output dir
    status: Mapped[str] = mapped_column(String(16), default=DeliveryStatus.PENDING, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None]

    job: Mapped[Job] = relationship(back_populates="deliveries")
    # Every C-STORE attempt, for the admin asking why a result reached the PACS late or never.
    history: Mapped[list[DeliveryAttempt]] = relationship(
        back_populates="delivery", order_by="DeliveryAttempt.id", lazy="selectin"
    )


class DeliveryAttempt(AttemptColumns, Base):
    """One C-STORE (or STOW-RS) attempt of a delivery; ``outcome`` a DeliveryStatus value."""

    __tablename__ = "delivery_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    delivery_id: Mapped[int] = mapped_column(ForeignKey("deliveries.id"), index=True)

    delivery: Mapped[Delivery] = relationship(back_populates="history")


class Worker(Base):
    """A worker process as it reports itself: what it serves, and its heartbeat.

    Written by the worker's main process every ``worker_heartbeat_seconds``; ``stopped_at`` is set on a
    clean shutdown. A row without a recent heartbeat and without ``stopped_at`` is a worker that died.
    """

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)  # the Celery node name
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[str] = mapped_column(String(255))  # comma-separated
    pool: Mapped[str] = mapped_column(String(16))
    concurrency: Mapped[int] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(32))  # None for delivery-only workers
    version: Mapped[str] = mapped_column(String(32))  # cxr-gateway's own version
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    stopped_at: Mapped[datetime | None]


class InstanceConflict(Base):
    """A SOP Instance UID sent again with different bytes: the first copy stays, a human looks at this.

    One row per (instance, differing content); ``count`` says how often that content came back.
    """

    __tablename__ = "instance_conflicts"
    __table_args__ = (UniqueConstraint("instance_id", "sha256"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"), index=True)
    sha256: Mapped[str] = mapped_column(String(64))  # of the refused copy
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(Integer)
    calling_ae_title: Mapped[str] = mapped_column(String(16))
    count: Mapped[int] = mapped_column(Integer, default=1)
    first_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)

    instance: Mapped[Instance] = relationship()


class AuditEntry(Base):
    """One admin action in the dashboard (requeue, cancel, replay, upload, reveal …): who, what, when.

    ``detail`` holds job/delivery ids and outcomes only, never patient data.
    """

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32), index=True)
    target_type: Mapped[str | None] = mapped_column(String(16))
    target_id: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSON)
    client_address: Mapped[str | None] = mapped_column(String(64))


class Notification(DueTimeColumns, Base):
    """One urgent finding of one job on one channel (HL7 v2, FHIR, webhook): service.core.notifications
    holds its state machine. The row is written with the job's result, before anything is sent.

    Unique per job × rule × channel × result: a re-run of the job with the same result finds its row; a
    changed result (another bundle, another image, another score) adds a row with the next ``revision``.
    """

    __tablename__ = "notifications"
    __table_args__ = (UniqueConstraint("job_id", "rule", "channel", "result_digest"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    rule: Mapped[str] = mapped_column(String(64))
    channel: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(16))  # "hl7" | "fhir" | "webhook"
    priority: Mapped[str] = mapped_column(String(16))  # service.notify.config.Priority
    # What is notified, as the result said it (finding, score, image, bundle): no patient data.
    finding: Mapped[dict[str, Any]] = mapped_column(JSON)
    result_digest: Mapped[str] = mapped_column(String(64))
    revision: Mapped[int] = mapped_column(Integer, default=0)
    status: Mapped[str] = mapped_column(String(16), default="pending", index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)  # all attempts, the claim's counter
    tries: Mapped[int] = mapped_column(Integer, default=0)  # attempts since the last replay
    # A reason code, then what the peer said (MSA/ERR text, OperationOutcome): shown to dashboard users,
    # never logged (a peer may echo patient data).
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    sent_at: Mapped[datetime | None]

    history: Mapped[list[NotificationAttempt]] = relationship(
        back_populates="notification", order_by="NotificationAttempt.id", lazy="selectin"
    )


class NotificationAttempt(AttemptColumns, Base):
    """One send of a notification; ``outcome`` sent | failed_retrying | dead, ``reason`` a coded reason."""

    __tablename__ = "notification_attempts"

    id: Mapped[int] = mapped_column(primary_key=True)
    notification_id: Mapped[int] = mapped_column(ForeignKey("notifications.id"), index=True)
    reason: Mapped[str | None] = mapped_column(String(40))

    notification: Mapped[Notification] = relationship(back_populates="history")


# Issue 17, the site loop: reader feedback, reference labels, exports for training, purges. ------------


class FindingFeedback(Base):
    """A reader's verdict on one finding of one job: agree / disagree / unsure with what the model said,
    or ``missed`` (present, the model said absent). One row per job × finding × reader, updated when the
    reader changes their mind; each change is also in the audit log.

    ``model_present`` is the model's call the reader judged, so a verdict keeps its meaning whichever job
    of the study is later validated (agree: truth = model_present; disagree: its opposite; missed: True).
    """

    __tablename__ = "finding_feedback"
    __table_args__ = (UniqueConstraint("job_id", "finding", "username"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    finding: Mapped[str] = mapped_column(String(64))
    verdict: Mapped[str] = mapped_column(String(16))  # service.site.feedback.Verdict
    model_present: Mapped[bool] = mapped_column(Boolean)
    username: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)


class LabelImport(Base):
    """One accepted reference-label file (CSV): who, when, what (no patient data; the file is not kept)."""

    __tablename__ = "label_imports"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    username: Mapped[str] = mapped_column(String(64))
    filename: Mapped[str | None] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64))
    studies: Mapped[int] = mapped_column(Integer)


class ReferenceLabel(Base):
    """A study's reference truth for one finding (e.g. from the RIS report): one row per study × model
    finding, present or absent; a later import of the same study replaces its rows."""

    __tablename__ = "reference_labels"
    __table_args__ = (UniqueConstraint("study_id", "finding"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    finding: Mapped[str] = mapped_column(String(64))
    present: Mapped[bool] = mapped_column(Boolean)
    import_id: Mapped[int] = mapped_column(ForeignKey("label_imports.id"), index=True)


class StudyExport(Base):
    """A study written out for training (``export-training``): retention keeps a labelled study's files
    until it has one of these rows (CXR_RETENTION_KEEP_LABELLED)."""

    __tablename__ = "study_exports"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    exported_at: Mapped[datetime] = mapped_column(default=utcnow)
    export_name: Mapped[str | None] = mapped_column(String(255))


class StudyPurge(Base):
    """The retention purge removed this study's spooled images and its jobs' outputs at ``purged_at``;
    the rows stay, and the dashboard says 'purged' for every job finished before then."""

    __tablename__ = "study_purges"

    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), primary_key=True)
    purged_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    files: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)


class Pull(Base):
    """An admin's request to fetch a study from the PACS: C-FIND on the Q/R peer, then C-MOVE to our
    listener, after which the study arrives like any other. ``service.core.pulls`` holds its states.

    What was asked (a Study Instance UID or an accession number) stays in this row; logs carry the id.
    """

    __tablename__ = "pulls"

    id: Mapped[int] = mapped_column(primary_key=True)
    requested_by: Mapped[str] = mapped_column(String(64))
    study_instance_uid: Mapped[str | None] = mapped_column(String(64))
    accession_number: Mapped[str | None] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued", index=True)
    studies_found: Mapped[int] = mapped_column(Integer, default=0)
    instances_moved: Mapped[int] = mapped_column(Integer, default=0)
    instances_failed: Mapped[int] = mapped_column(Integer, default=0)
    # Why it failed, or what the peer's final status said: statuses and counts, never patient data.
    detail: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


# Issue 17, the site loop: operating points, bundles, candidate results. --------------------------------


class OperatingPointSet(Base):
    """One version of the site's thresholds for one bundle version: append-only. The active set is the
    newest row of the live bundle's version; ``thresholds`` empty means the bundle's own defaults (a
    revert to them is a new row too). Each row is audited by whoever wrote it."""

    __tablename__ = "operating_point_sets"

    id: Mapped[int] = mapped_column(primary_key=True)  # the version number shown and recorded
    bundle_version: Mapped[str] = mapped_column(String(64), index=True)
    thresholds: Mapped[dict[str, Any]] = mapped_column(JSON)  # finding → threshold; only site-set ones
    # How each was chosen, e.g. {"Effusion": "sensitivity >= 0.90 on 120 studies"}, or "revert to 3".
    reason: Mapped[str] = mapped_column(Text)
    username: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class BundleRecord(Base):
    """A registered model bundle: the live one serves the PACS, candidates run in shadow beside it."""

    __tablename__ = "bundles"

    id: Mapped[int] = mapped_column(primary_key=True)
    version: Mapped[str] = mapped_column(String(64), unique=True)
    name: Mapped[str] = mapped_column(String(128))
    path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    status: Mapped[str] = mapped_column(String(16), index=True)  # service.site.bundles.BundleStatus
    registered_by: Mapped[str] = mapped_column(String(64))
    registered_at: Mapped[datetime] = mapped_column(default=utcnow)
    changed_at: Mapped[datetime] = mapped_column(default=utcnow)


class JobResult(Base):
    """A candidate bundle's result on a job (the live bundle's is the job's own ``result``): scores and
    calls only, no output object, so nothing of it can reach the PACS."""

    __tablename__ = "job_results"
    __table_args__ = (UniqueConstraint("job_id", "bundle_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    bundle_version: Mapped[str] = mapped_column(String(64), index=True)
    result: Mapped[dict[str, Any]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
