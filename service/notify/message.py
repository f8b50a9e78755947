"""What one notification says, gathered from its row, its job and its study: the builders' only input."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from service.notify.config import Priority


@dataclass(frozen=True)
class Urgent:
    notification_id: int
    job_id: str
    revision: int  # 0: the first result; n: the n-th changed result (a correction)
    rule: str
    priority: Priority
    label: str  # the bundle's finding label, e.g. "Pneumothorax"
    score: float
    score_kind: str  # "probability" (calibrated bundle) or "score"
    min_score: float | None  # the rule's threshold; None: the bundle's operating point
    sop_instance_uid: str  # the image the finding is on
    study_instance_uid: str
    accession_number: str | None
    patient_id: str | None
    patient_name: str | None  # DICOM PN, e.g. "Doe^Jane"
    bundle_name: str
    bundle_version: str
    observed_at: datetime  # when the result was made

    @property
    def control_id(self) -> str:
        """Stable across retries of this notification, so a receiver can drop a duplicate."""
        return f"CXR{self.notification_id}"

    @property
    def corrected(self) -> bool:
        return self.revision > 0
