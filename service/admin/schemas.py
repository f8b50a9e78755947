"""JSON shapes of the dashboard API. Patient names and IDs appear only in ``PatientOut`` (admins)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from service.core.status import JobStatus


class StageTimes(BaseModel):
    received_at: datetime
    queued_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    intake_s: float | None = Field(description="received → queued (study assembly)")
    queue_wait_s: float | None = Field(description="queued → running")
    run_s: float | None = Field(description="running → finished")
    total_s: float | None = Field(description="received → finished")


class DeliveryAttemptOut(BaseModel):
    started_at: datetime
    seconds: float
    outcome: str
    error: str | None


class DeliveryOut(BaseModel):
    id: int
    job_id: str
    ae_title: str
    host: str
    port: int
    kind: str
    status: str
    attempts: int
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    next_attempt_at: datetime | None = Field(
        default=None, description="when a pending or retrying delivery is due (None once it is final)"
    )
    history: list[DeliveryAttemptOut] = Field(description="every C-STORE attempt, oldest first")


class JobOut(BaseModel):
    id: str
    status: JobStatus
    reason_code: str | None
    calling_ae_title: str | None
    bundle_version: str | None
    mode: str | None = Field(default=None, description="live or shadow (nothing sent); None until run")
    attempts: int
    worker: str | None = Field(description="the worker that ran (or runs) it last")
    created_at: datetime
    accession_masked: str | None = Field(description="last characters of the accession number only")
    stages: StageTimes
    deliveries: list[DeliveryOut]
    viewer_url: str | None = Field(
        default=None, description="the study in the site's viewer (CXR_VIEWER_URL); null when unset"
    )


class JobEventOut(BaseModel):
    status: str
    reason_code: str | None
    at: datetime


class RegionOut(BaseModel):
    """Where a finding present at its operating point is, in the source image's pixel coordinates."""

    model_config = ConfigDict(allow_inf_nan=False)

    label: str
    kind: Literal["outline", "box"]
    level: float = Field(description="fraction of the finding's heatmap maximum the outline follows")
    peak: tuple[float, float] = Field(description="(column, row) of the heatmap's maximum")
    polygon: list[tuple[float, float]] = Field(
        min_length=3, description="closed outline, (column, row) points, the last repeating the first"
    )
    value: float | None = Field(default=None, description="the finding's score or probability")


class ImageOut(BaseModel):
    sop_instance_uid: str
    modality: str | None
    decision: str = Field(description='"analysed" or the gate/pixel reason code')
    probabilities: dict[str, float] | None = None
    present: list[str] = []
    rows: int | None = Field(default=None, description="source image height in pixels")
    columns: int | None = Field(default=None, description="source image width in pixels")
    score_kind: Literal["probability", "score"] | None = Field(
        default=None, description="what the values are: probabilities only for a calibrated model"
    )
    regions: list[RegionOut] = []
    source_image: str | None = Field(default=None, description="URL of the source image as a PNG thumbnail")


class JobDetailOut(JobOut):
    reason_detail: str | None
    result: dict[str, Any] | None
    events: list[JobEventOut]
    images: list[ImageOut]
    heatmaps: list[str] = Field(description="URLs of the heatmap images (PNG)")


class JobPage(BaseModel):
    total: int
    limit: int
    offset: int
    items: list[JobOut]


class PatientOut(BaseModel):
    patient_name: str | None
    patient_id: str | None
    accession_number: str | None


class RequeueOut(BaseModel):
    requeued_from: str
    job: JobOut


class AuditOut(BaseModel):
    id: int
    at: datetime
    username: str
    action: str
    target_type: str | None
    target_id: str | None
    detail: dict[str, Any] | None
    client_address: str | None


class AuditPage(BaseModel):
    total: int
    items: list[AuditOut]


class PeerOut(BaseModel):
    target: str = Field(description='"listener" or "destination:<index>" for /api/peers/echo')
    role: Literal["listener", "destination", "source"]
    ae_title: str
    host: str
    port: int | None
    tls: bool


class EchoIn(BaseModel):
    target: str = Field(examples=["listener", "destination:0"])


class EchoOut(BaseModel):
    target: str
    ok: bool
    detail: str
    elapsed_ms: int


class UploadOut(BaseModel):
    study_id: int | None = Field(description="database id of the study (appears once the listener stored it)")
    kind: Literal["dicom", "image"]
    detail: str


class Me(BaseModel):
    username: str
    role: str
