"""The bundle registry: model bundles a site has registered, one ``live`` (its outputs reach the PACS),
any number of ``candidate`` ones (run in shadow beside it on the same studies, their results stored per
job in ``job_results``, never an output object), the rest ``retired``.

Promoting a candidate retires the live bundle; rolling back makes a retired bundle live again. The worker
reads the live row at job time and switches when it changed (worker.site). With no row at all the
configured CXR_MODEL_BUNDLE is live, and the first registration records it as such.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import BundleRecord, Job, JobResult, Study
from service.core.status import JobStatus
from service.site.findings import ModelFindings, bundle_findings
from service.site.validation import StudyCase, labelled_cases, study_cases

# The files that define a bundle's behaviour, hashed in this order (as worker.inference.bundle does).
_HASHED = (
    "configs/metadata.json",
    "configs/inference.json",
    "models/model.safetensors",
    "models/model.onnx",
    "models/model.int8.onnx",
)


class BundleStatus(StrEnum):
    LIVE = "live"
    CANDIDATE = "candidate"
    RETIRED = "retired"


class RegistryError(ValueError):
    """A bundle that cannot be registered, promoted or rolled back."""


def bundle_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    for rel in _HASHED:
        file = path / rel
        if rel.endswith(".onnx") and not file.is_file():
            continue
        digest.update(rel.encode())
        with file.open("rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _metadata(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "configs" / "metadata.json").read_text())
    except (OSError, ValueError) as exc:
        raise RegistryError(f"not a bundle (configs/metadata.json): {type(exc).__name__}") from None
    if not isinstance(meta, dict) or not meta.get("labels") or "version" not in meta:
        raise RegistryError("configs/metadata.json names no version or no labels")
    return meta


def _row(session: Session, path: Path, status: BundleStatus, username: str) -> BundleRecord:
    path = path.resolve()
    meta = _metadata(path)
    version = str(meta["version"])
    if session.scalars(select(BundleRecord).where(BundleRecord.version == version)).first():
        raise RegistryError(f"bundle version {version} is registered already")
    try:
        sha = bundle_sha256(path)
    except OSError as exc:
        raise RegistryError(f"bundle files missing: {type(exc).__name__}") from None
    row = BundleRecord(
        version=version,
        name=str(meta.get("name", path.name)),
        path=str(path),
        sha256=sha,
        status=status,
        registered_by=username,
    )
    session.add(row)
    session.flush()
    return row


def all_bundles(session: Session) -> list[BundleRecord]:
    return list(session.scalars(select(BundleRecord).order_by(BundleRecord.id)))


def live(session: Session) -> BundleRecord | None:
    return session.scalars(select(BundleRecord).where(BundleRecord.status == BundleStatus.LIVE)).first()


def candidates(session: Session) -> list[BundleRecord]:
    return list(
        session.scalars(
            select(BundleRecord)
            .where(BundleRecord.status == BundleStatus.CANDIDATE)
            .order_by(BundleRecord.id)
        )
    )


def live_path(session: Session, configured: Path) -> Path:
    """The bundle serving the PACS: the registry's live row, else the configured one."""
    row = live(session)
    return Path(row.path) if row else configured


def live_findings(session: Session, configured: Path) -> ModelFindings:
    return bundle_findings(live_path(session, configured))


def register(session: Session, path: Path, configured: Path, *, username: str) -> BundleRecord:
    """A new candidate (the caller commits and audits); the configured bundle becomes the live row
    first when the registry is empty, so there is always one to compare with and roll back to."""
    if live(session) is None:
        _row(session, configured, BundleStatus.LIVE, username)
    return _row(session, path, BundleStatus.CANDIDATE, username)


def _by_version(session: Session, version: str) -> BundleRecord:
    row = session.scalars(select(BundleRecord).where(BundleRecord.version == version)).first()
    if row is None:
        raise RegistryError(f"no registered bundle version {version}")
    return row


def promote(session: Session, version: str) -> tuple[BundleRecord, BundleRecord | None]:
    """``version`` (a candidate, or a retired bundle: a roll-back) becomes live; the live one retires.
    Returns the new live row and the one it replaced."""
    row = _by_version(session, version)
    if row.status == BundleStatus.LIVE:
        raise RegistryError(f"bundle {version} is live already")
    if bundle_sha256(Path(row.path)) != row.sha256:
        raise RegistryError(f"bundle {version} changed on disk since it was registered")
    now = datetime.now(UTC)
    before = live(session)
    if before is not None:
        before.status, before.changed_at = BundleStatus.RETIRED, now
        session.flush()
    row.status, row.changed_at = BundleStatus.LIVE, now
    session.flush()
    return row, before


def set_status(session: Session, version: str, status: BundleStatus) -> BundleRecord:
    """Retire a candidate, or make a retired bundle a candidate again (never the live one)."""
    row = _by_version(session, version)
    if row.status == BundleStatus.LIVE or status == BundleStatus.LIVE:
        raise RegistryError("the live bundle changes only by promoting another")
    row.status, row.changed_at = status, datetime.now(UTC)
    session.flush()
    return row


@dataclass(frozen=True)
class Compared:
    """One registered version's labelled cases: from the jobs it served live, and from its shadow runs."""

    version: str
    status: str
    cases: list[StudyCase]


def compare(session: Session) -> list[Compared]:
    """Each registered version's labelled cases on the site's studies (validation per version)."""
    out = []
    for row in all_bundles(session):
        served = labelled_cases(session, bundle_version=row.version)
        shadow = study_cases(session, _shadow_rows(session, row.version))
        by_study = {c.study_id: c for c in shadow}
        by_study.update({c.study_id: c for c in served})  # its own live result wins
        out.append(Compared(row.version, row.status, list(by_study.values())))
    return out


def _shadow_rows(session: Session, version: str) -> list[Any]:
    stmt = (
        select(
            JobResult.job_id.label("id"),
            Job.study_id,
            JobResult.result,
            JobResult.bundle_version,
            Study.patient_id,
        )
        .join(Job, Job.id == JobResult.job_id)
        .join(Study, Study.id == Job.study_id)
        .where(JobResult.bundle_version == version, Job.status == JobStatus.DONE)
        .order_by(Job.created_at, Job.id)
    )
    return list(session.execute(stmt))
