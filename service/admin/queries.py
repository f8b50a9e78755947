"""Reading jobs for the pages and the API: filters, paging, stage times, per-image results, heatmaps."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError
from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session, selectinload

from service.admin.schemas import (
    DeliveryAttemptOut,
    DeliveryOut,
    ImageOut,
    JobDetailOut,
    JobEventOut,
    JobOut,
    JobPage,
    RegionOut,
    StageTimes,
)
from service.core.models import Delivery, Instance, Job
from service.core.status import JobStatus, OutputKind


@dataclass(frozen=True)
class JobFilter:
    status: JobStatus | None = None
    since: date | None = None  # received on or after (UTC day)
    until: date | None = None  # received on or before (UTC day)
    source_ae: str | None = None
    destination: str | None = None

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        if self.status is not None:
            stmt = stmt.where(Job.status == self.status)
        if self.since is not None:
            stmt = stmt.where(Job.received_at >= datetime.combine(self.since, time(), tzinfo=UTC))
        if self.until is not None:
            end = datetime.combine(self.until + timedelta(days=1), time(), tzinfo=UTC)
            stmt = stmt.where(Job.received_at < end)
        if self.source_ae:
            stmt = stmt.where(Job.calling_ae_title == self.source_ae)
        if self.destination:
            stmt = stmt.where(
                Job.id.in_(select(Delivery.job_id).where(Delivery.ae_title == self.destination))
            )
        return stmt


def mask_accession(value: str | None) -> str | None:
    """Enough to tell two studies apart on a screen, not enough to look a patient up."""
    if not value:
        return None
    keep = 3 if len(value) > 4 else 1
    return "•" * max(3, len(value) - keep) + value[-keep:]


def _seconds(a: datetime | None, b: datetime | None) -> float | None:
    return round((b - a).total_seconds(), 3) if a and b else None


def delivery_out(d: Delivery) -> DeliveryOut:
    return DeliveryOut(
        id=d.id,
        job_id=d.job_id,
        ae_title=d.ae_title,
        host=d.host,
        port=d.port,
        kind=d.kind,
        status=d.status,
        attempts=d.attempts,
        last_error=d.last_error,
        created_at=d.created_at,
        delivered_at=d.delivered_at,
        next_attempt_at=d.next_attempt_at,
        history=[
            DeliveryAttemptOut(
                started_at=a.started_at,
                seconds=round((a.finished_at - a.started_at).total_seconds(), 3),
                outcome=a.outcome,
                error=a.error,
            )
            for a in d.history
        ],
    )


def viewer_link(template: str | None, study_uid: str) -> str | None:
    """The study in the site's viewer: ``template`` (CXR_VIEWER_URL) with the URL-quoted study UID."""
    if not template or not study_uid:
        return None
    return template.format(study_uid=quote(study_uid, safe=""))


def _job_fields(job: Job, viewer: str | None = None) -> dict[str, Any]:
    stages = StageTimes(
        received_at=job.received_at,
        queued_at=job.queued_at,
        started_at=job.started_at,
        finished_at=job.finished_at,
        intake_s=_seconds(job.received_at, job.queued_at),
        queue_wait_s=_seconds(job.queued_at, job.started_at),
        run_s=_seconds(job.started_at, job.finished_at),
        total_s=_seconds(job.received_at, job.finished_at),
    )
    return {
        "id": job.id,
        "status": JobStatus(job.status),
        "reason_code": job.reason_code,
        "calling_ae_title": job.calling_ae_title,
        "bundle_version": job.bundle_version,
        "mode": job.mode,
        "attempts": job.attempts,
        "worker": job.worker,
        "created_at": job.created_at,
        "accession_masked": mask_accession(job.study.accession_number),
        "stages": stages,
        "deliveries": [delivery_out(d) for d in job.deliveries],
        "viewer_url": viewer_link(viewer, job.study.study_instance_uid),
    }


def job_out(job: Job, viewer: str | None = None) -> JobOut:
    """``viewer``: the CXR_VIEWER_URL template, for the job's link to its study in the viewer."""
    return JobOut(**_job_fields(job, viewer))


def list_jobs(
    session: Session, flt: JobFilter, limit: int, offset: int, viewer: str | None = None
) -> JobPage:
    stmt = flt.apply(select(Job).options(selectinload(Job.deliveries), selectinload(Job.study)))
    count = flt.apply(select(func.count()).select_from(Job))
    jobs = session.scalars(stmt.order_by(Job.created_at.desc(), Job.id).limit(limit).offset(offset)).all()
    return JobPage(
        total=session.scalar(count) or 0, limit=limit, offset=offset, items=[job_out(j, viewer) for j in jobs]
    )


def filter_choices(session: Session) -> tuple[list[str], list[str]]:
    """Source AE titles and destination AE titles seen so far, for the filter drop-downs."""
    sources = session.scalars(
        select(Job.calling_ae_title).where(Job.calling_ae_title.is_not(None)).distinct().limit(200)
    ).all()
    destinations = session.scalars(select(Delivery.ae_title).distinct().limit(200)).all()
    return sorted(s for s in sources if s), sorted(destinations)


def heatmap_paths(job: Job, output_dir: Path) -> list[Path]:
    """The job's heatmap Secondary Capture files, one per analysed image, in image order.

    Read from the job's output folder, not from its deliveries: a site with no destination, or whose
    destinations take no SC, still sees the heatmaps here.
    """
    folder = (output_dir / job.id).resolve()
    if not folder.is_relative_to(output_dir.resolve()) or not folder.is_dir():
        return []
    numbered = []
    for path in folder.glob(f"{OutputKind.SC}-*.dcm"):
        index = path.stem.removeprefix(f"{OutputKind.SC}-")
        if index.isdigit():
            numbered.append((int(index), path))
    return [path for _, path in sorted(numbered)]


def _result_images(result: dict[str, Any]) -> list[Any]:
    images = result.get("images")
    return images if isinstance(images, list) else []


def _positive_int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _regions(raw: Any, probs: dict[str, float]) -> list[RegionOut]:
    """The image's regions as the worker recorded them; an entry that does not fit is left out."""
    regions: list[RegionOut] = []
    for item in raw if isinstance(raw, list) else []:
        if not isinstance(item, dict):
            continue
        try:
            region = RegionOut.model_validate({**item, "value": probs.get(str(item.get("label")))})
        except ValidationError:
            continue
        regions.append(region)
    return regions


def _analysed_image(job: Job, n: int, uid: str, modality: str | None, img: dict[str, Any]) -> ImageOut:
    raw = img.get("probabilities")
    probs = {str(k): float(v) for k, v in (raw if isinstance(raw, dict) else {}).items()}
    kind = img.get("score_kind")
    return ImageOut(
        sop_instance_uid=uid,
        modality=modality,
        decision="analysed",
        probabilities=probs,
        present=[str(x) for x in img.get("present") or []],
        rows=_positive_int(img.get("rows")),
        columns=_positive_int(img.get("columns")),
        score_kind=kind if kind in ("probability", "score") else None,
        regions=_regions(img.get("regions"), probs),
        source_image=f"/api/jobs/{job.id}/images/{n}.png",
    )


def job_detail(session: Session, job: Job, output_dir: Path, viewer: str | None = None) -> JobDetailOut:
    """``viewer``: the CXR_VIEWER_URL template, for the link to the study in the site's viewer."""
    result = job.result or {}
    by_uid: dict[str, tuple[int, dict[str, Any]]] = {}
    for n, img in enumerate(_result_images(result)):
        if isinstance(img, dict) and img.get("sop_instance_uid"):
            by_uid.setdefault(str(img["sop_instance_uid"]), (n, img))
    raw_gate = result.get("gate")
    gate: dict[str, Any] = raw_gate if isinstance(raw_gate, dict) else {}
    stmt = select(Instance.sop_instance_uid, Instance.modality).where(Instance.study_id == job.study_id)
    if job.queued_at is not None:
        # Instances that arrived after this job was queued belong to a later job.
        stmt = stmt.where(Instance.received_at <= job.queued_at)
    instances = session.execute(stmt.order_by(Instance.id)).all()
    known = {row.sop_instance_uid for row in instances}
    # The result may name images not listed above (clock skew between processes): show those too.
    rows = [(row.sop_instance_uid, row.modality) for row in instances]
    rows += [(uid, None) for uid in [*by_uid, *gate] if uid not in known]
    images: list[ImageOut] = []
    for uid, modality in dict.fromkeys(rows):
        found = by_uid.get(uid)
        if found is not None:
            images.append(_analysed_image(job, found[0], uid, modality, found[1]))
        else:
            decision = str(gate.get(uid)) if gate.get(uid) else ("pending" if not result else "not analysed")
            images.append(ImageOut(sop_instance_uid=uid, modality=modality, decision=decision))
    heatmaps = [f"/api/jobs/{job.id}/heatmaps/{n}.png" for n in range(len(heatmap_paths(job, output_dir)))]
    return JobDetailOut(
        **_job_fields(job, viewer),
        reason_detail=job.reason_detail,
        result=job.result,
        events=[JobEventOut(status=e.status, reason_code=e.reason_code, at=e.at) for e in job.events],
        images=images,
        heatmaps=heatmaps,
    )


def source_image(session: Session, job: Job, n: int, spool_dir: Path) -> tuple[Path, dict[str, Any]] | None:
    """The spooled file of the job's n-th analysed image (``result["images"][n]``) and that entry.

    None when there is no such image, the instance is not the job's study's, or its file is gone; a
    spool path that would leave the spool dir is ignored.
    """
    images = _result_images(job.result or {})
    if not 0 <= n < len(images) or not isinstance(images[n], dict):
        return None
    uid = images[n].get("sop_instance_uid")
    if not uid:
        return None
    rel = session.scalar(
        select(Instance.spool_path).where(
            Instance.study_id == job.study_id, Instance.sop_instance_uid == str(uid)
        )
    )
    if rel is None:
        return None
    root = spool_dir.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root) or not path.is_file():
        return None
    return path, images[n]


def get_job(session: Session, job_id: str) -> Job | None:
    return session.scalar(
        select(Job)
        .where(Job.id == job_id)
        .options(selectinload(Job.deliveries), selectinload(Job.study), selectinload(Job.events))
    )
