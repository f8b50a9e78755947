"""The site loop in the dashboard: reader feedback on a job, reference-label imports, local validation,
retention (disk use by age). Readers (radiologists) write feedback and labels; viewers only read."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, HTTPException, Query, Request, UploadFile
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.admin import actions
from service.admin.deps import DB, Client, Ctx, Reviewer, User, job_or_404
from service.admin.pages import flash, render
from service.core.db import database_now
from service.core.models import Job, LabelImport, StudyPurge
from service.core.retention import disk_use, purge
from service.core.settings import Settings
from service.site import feedback, labels
from service.site.feedback import FeedbackError, Verdict
from service.site.findings import ModelFindings
from service.site.operating_points import site_findings
from service.site.report import charts_base64, fmt, fmt_auroc, render_html
from service.site.validation import ValidationReport, validate

router = APIRouter()
pages = APIRouter(include_in_schema=False)


def _model(session: Session, settings: Settings) -> ModelFindings:
    # The live bundle (service.site.bundles) at the site's operating points (service.site.operating_points).
    return site_findings(session, settings.model_bundle)


# ------------------------------------------------------------------------------------------- feedback


class VerdictIn(BaseModel):
    finding: str = Field(max_length=64)
    verdict: Verdict


class FeedbackIn(BaseModel):
    verdicts: list[VerdictIn] = Field(min_length=1, max_length=64)


class FeedbackOut(BaseModel):
    finding: str
    verdict: str
    model_present: bool
    username: str
    updated_at: datetime


def _record(session: Session, job: Job, verdicts: list[VerdictIn], who: Any, client: str) -> None:
    """All verdicts or none (one transaction), each audited."""
    for item in verdicts:
        feedback.record(session, job, item.finding, item.verdict, who.username)
        actions.audit(
            session,
            who,
            "finding_feedback",
            target_type="job",
            target_id=job.id,
            detail={"finding": item.finding, "verdict": str(item.verdict)},
            client=client,
        )
    session.commit()


@router.get("/api/jobs/{job_id}/feedback", tags=["site"])
def api_feedback(job_id: str, session: DB, user: User) -> list[FeedbackOut]:
    """Every reader's verdicts on the job's findings, newest first."""
    job_or_404(session, job_id)
    return [FeedbackOut(**vars(f)) for f in feedback.job_feedback(session, job_id)]


@router.post("/api/jobs/{job_id}/feedback", tags=["site"])
def api_record_feedback(
    job_id: str, body: FeedbackIn, session: DB, who: Reviewer, client: Client
) -> list[FeedbackOut]:
    """Record verdicts (agree / disagree / unsure / missed) on findings of the job (readers, admins)."""
    job = job_or_404(session, job_id)
    try:
        _record(session, job, body.verdicts, who, client)
    except FeedbackError as exc:
        session.rollback()
        raise HTTPException(status_code=422, detail=str(exc)) from None
    return [FeedbackOut(**vars(f)) for f in feedback.job_feedback(session, job_id)]


@pages.post("/jobs/{job_id}/feedback")
async def record_feedback_form(
    request: Request, job_id: str, session: DB, who: Reviewer, client: Client
) -> Response:
    """The job page's form: ``verdict:<finding>`` radio buttons and a ``missed`` finding."""
    job = job_or_404(session, job_id)
    form = await request.form()
    verdicts = [
        VerdictIn(finding=str(key)[8:], verdict=Verdict(str(value)))
        for key, value in form.multi_items()
        if str(key).startswith("verdict:") and str(value) in {v.value for v in Verdict}
    ]
    missed = str(form.get("missed") or "")
    if missed:
        verdicts.append(VerdictIn(finding=missed[:64], verdict=Verdict.MISSED))
    if not verdicts:
        flash(request, "error", "No verdict chosen.")
    else:
        try:
            _record(session, job, verdicts, who, client)
            flash(request, "ok", f"Feedback recorded on {len(verdicts)} findings.")
        except FeedbackError as exc:
            session.rollback()
            flash(request, "error", f"Feedback not recorded: {exc}")
    return RedirectResponse(f"/jobs/{job_id}#feedback", status_code=303)


# ------------------------------------------------------------------------------------------- labels


class LabelImportOut(BaseModel):
    import_id: int
    studies: int
    sha256: str


def _import(session: Session, ctx: Any, upload: UploadFile, who: Any, client: str) -> LabelImport:
    limit = ctx.settings.dashboard_upload_max_bytes
    data = upload.file.read(limit + 1)
    if len(data) > limit:
        raise labels.LabelFileError([labels.Problem(0, "the file is larger than the upload limit")])
    record = labels.import_labels(
        session, data, _model(session, ctx.settings), username=who.username, filename=upload.filename
    )
    actions.audit(
        session,
        who,
        "label_import",
        target_type="label_import",
        target_id=str(record.id),
        detail={"studies": record.studies, "sha256": record.sha256},
        client=client,
    )
    session.commit()
    return record


def _problems(exc: labels.LabelFileError) -> list[dict[str, Any]]:
    return [{"line": p.line, "message": p.message} for p in exc.problems]


@router.post("/api/labels", tags=["site"], status_code=201, response_model=LabelImportOut)
def api_import_labels(
    session: DB, ctx: Ctx, who: Reviewer, client: Client, file: Annotated[UploadFile, File()]
) -> Any:
    """Reference labels from a CSV (StudyInstanceUID or AccessionNumber, Findings ``|``-separated or
    ``No Finding``): all rows or none; 422 lists every bad line."""
    try:
        record = _import(session, ctx, file, who, client)
    except labels.LabelFileError as exc:
        session.rollback()
        return JSONResponse(
            {"detail": "label file refused; nothing imported", "problems": _problems(exc)}, status_code=422
        )
    return LabelImportOut(import_id=record.id, studies=record.studies, sha256=record.sha256)


def _labels_page(
    request: Request, session: Session, problems: list[dict[str, Any]], status: int
) -> HTMLResponse:
    imports = session.scalars(select(LabelImport).order_by(LabelImport.id.desc()).limit(50)).all()
    model = _model(session, request.app.state.ctx.settings)
    return render(
        request,
        "site_labels.html",
        {"imports": imports, "problems": problems, "labels": model.labels},
        status,
    )


@pages.get("/labels", response_class=HTMLResponse)
def labels_page(request: Request, session: DB, user: User) -> HTMLResponse:
    return _labels_page(request, session, [], 200)


@pages.post("/labels", response_class=HTMLResponse)
def labels_upload(
    request: Request,
    session: DB,
    ctx: Ctx,
    who: Reviewer,
    client: Client,
    file: Annotated[UploadFile, File()],
) -> Response:
    try:
        record = _import(session, ctx, file, who, client)
    except labels.LabelFileError as exc:
        session.rollback()
        return _labels_page(request, session, _problems(exc), 422)
    flash(request, "ok", f"Imported reference labels for {record.studies} studies.")
    return RedirectResponse("/labels", status_code=303)


# ------------------------------------------------------------------------------------------- validation


def _day(value: str) -> datetime | None:
    try:
        day = date.fromisoformat(value) if value else None
    except ValueError:
        raise HTTPException(status_code=422, detail="dates are YYYY-MM-DD") from None
    return datetime.combine(day, time(), tzinfo=UTC) if day else None


DayField = Annotated[str, Query(max_length=10)]
VersionField = Annotated[str, Query(max_length=64)]


@dataclass(frozen=True)
class ValidationQuery:
    """The validation's filters, shared by its JSON, its page and its report."""

    since: str
    until: str
    bundle_version: str

    def run(self, session: Session, settings: Settings) -> ValidationReport:
        model = _model(session, settings)
        return validate(
            session,
            model.labels,
            model.operating_points,
            since=_day(self.since),
            until=_day(self.until),
            bundle_version=self.bundle_version or None,
        )


def validation_query(
    since: DayField = "", until: DayField = "", bundle_version: VersionField = ""
) -> ValidationQuery:
    return ValidationQuery(since, until, bundle_version)


Filters = Annotated[ValidationQuery, Depends(validation_query)]


@router.get("/api/validation", tags=["site"])
def api_validation(session: DB, ctx: Ctx, user: User, query: Filters) -> dict[str, Any]:
    """Per-finding figures on the labelled studies at the bundle's operating points, with 95 % intervals."""
    return query.run(session, ctx.settings).as_json()


@pages.get("/validation", response_class=HTMLResponse)
def validation_page(request: Request, session: DB, ctx: Ctx, user: User, query: Filters) -> HTMLResponse:
    report = query.run(session, ctx.settings)
    versions = session.scalars(
        select(Job.bundle_version).where(Job.bundle_version.is_not(None)).distinct()
    ).all()
    return render(
        request,
        "site_validation.html",
        {
            "report": report,
            "charts": charts_base64(report) if report.studies else None,
            "fmt": fmt,
            "fmt_auroc": fmt_auroc,
            "values": vars(query),
            "versions": sorted(v for v in versions if v),
        },
    )


@pages.get("/validation/report.html")
def validation_report(session: DB, ctx: Ctx, user: User, query: Filters) -> Response:
    """The committee's copy: one self-contained HTML file, downloaded (never shown under the dashboard)."""
    html = render_html(query.run(session, ctx.settings), model=ctx.bundle_label)
    return Response(
        html,
        media_type="text/html; charset=utf-8",
        headers={"Content-Disposition": 'attachment; filename="validation-report.html"'},
    )


# ------------------------------------------------------------------------------------------- retention


def _retention(session: Session, ctx: Any) -> dict[str, Any]:
    settings = ctx.settings
    now = database_now(ctx.sessions)
    plan = purge(ctx.sessions, settings, now, dry_run=True)
    purged = session.execute(select(func.count(), func.coalesce(func.sum(StudyPurge.bytes), 0))).one()
    return {
        "disk": {name: [vars(b) for b in buckets] for name, buckets in disk_use(settings, now).items()},
        "retention_days": settings.retention_days,
        "keep_labelled": settings.retention_keep_labelled,
        "due": {"studies": len(plan.purged), "files": plan.files, "bytes": plan.bytes},
        "kept_unsettled": plan.kept_unsettled,
        "kept_labelled": plan.kept_labelled,
        "purged": {"studies": int(purged[0]), "bytes": int(purged[1])},
    }


@router.get("/api/retention", tags=["site"])
def api_retention(session: DB, ctx: Ctx, user: User) -> dict[str, Any]:
    """Disk use of the spool and the outputs by age, and what the next purge would remove."""
    return _retention(session, ctx)


@pages.get("/retention", response_class=HTMLResponse)
def retention_page(request: Request, session: DB, ctx: Ctx, user: User) -> HTMLResponse:
    return render(request, "site_retention.html", {"r": _retention(session, ctx)})
