"""The site loop's admin side in the dashboard: site operating points (set by value or from the labelled
studies, versioned, reverted), the bundle registry (register, compare, promote, roll back) and drift.
Everyone signed in reads; only admins change thresholds or bundles (403 for readers and viewers), each
change audited."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from html import escape
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, Field, model_validator
from sqlalchemy.orm import Session

from service.admin import actions
from service.admin.auth import Principal
from service.admin.deps import DB, Admin, Client, Context, Ctx, User
from service.admin.pages import flash, render
from service.site import bundles, operating_points
from service.site.drift import WeekDrift, drift, latest_psi
from service.site.findings import bundle_findings
from service.site.operating_points import OperatingPointError, Target
from service.site.validation import finding_figures, labelled_cases

router = APIRouter()
pages = APIRouter(include_in_schema=False)
COMPARE_RESAMPLES = 200  # per finding and version on the bundles page: intervals, not a committee report


# ------------------------------------------------------------------------------------------- thresholds


class ThresholdsIn(BaseModel):
    """Either thresholds by value, or one finding's threshold chosen on the labelled studies."""

    thresholds: dict[str, float] | None = None
    finding: str | None = Field(default=None, max_length=64)
    target: Target | None = None
    value: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _one_way(self) -> ThresholdsIn:
        chosen = self.finding is not None and self.target is not None and self.value is not None
        if (self.thresholds is not None) == chosen:
            raise ValueError("give either thresholds, or finding + target + value")
        return self


class RevertIn(BaseModel):
    to_version: int | None = Field(default=None, description="None: the bundle's own thresholds")


def _points(session: Session, ctx: Context) -> dict[str, Any]:
    model = bundles.live_findings(session, ctx.settings.model_bundle)
    version = model.version or ""
    points = operating_points.effective(session, version, model.operating_points)
    return {
        "bundle_version": model.version,
        "active_version": points.version,
        "thresholds": points.thresholds,
        "bundle_defaults": model.operating_points,
        "site": sorted(points.site),
        "history": [
            {
                "version": row.id,
                "thresholds": row.thresholds,
                "reason": row.reason,
                "username": row.username,
                "created_at": row.created_at.isoformat(),
            }
            for row in operating_points.history(session, version)
        ],
    }


def _set(session: Session, ctx: Context, body: ThresholdsIn, who: Principal, client: str) -> int:
    model = bundles.live_findings(session, ctx.settings.model_bundle)
    if model.version is None:
        raise OperatingPointError("the live bundle has no version")
    if body.thresholds is not None:
        thresholds, reason = body.thresholds, "set by value"
    else:
        assert body.finding is not None and body.target is not None and body.value is not None
        finding = model.resolve(body.finding) or body.finding
        cases = labelled_cases(session, bundle_version=model.version)
        choice = operating_points.choose(cases, finding, body.target, body.value)
        thresholds, reason = {finding: choice.threshold}, f"{body.target} ≥ {body.value:.2f}: {choice.reason}"
    row = operating_points.set_thresholds(
        session, model.version, model.labels, thresholds, reason=reason, username=who.username
    )
    actions.audit(
        session,
        who,
        "operating_points_set",
        target_type="operating_points",
        target_id=str(row.id),
        detail={"bundle_version": model.version, "thresholds": thresholds, "reason": reason},
        client=client,
    )
    session.commit()
    return row.id


def _revert(session: Session, ctx: Context, to_version: int | None, who: Principal, client: str) -> int:
    model = bundles.live_findings(session, ctx.settings.model_bundle)
    row = operating_points.revert(session, model.version or "", to_version, username=who.username)
    actions.audit(
        session,
        who,
        "operating_points_revert",
        target_type="operating_points",
        target_id=str(row.id),
        detail={"bundle_version": model.version, "to_version": to_version},
        client=client,
    )
    session.commit()
    return row.id


@contextmanager
def _refused(session: Session, *errors: type[Exception]) -> Iterator[None]:
    """A site-loop action the rules refuse: nothing of it is kept, and the API answers 422."""
    try:
        yield
    except errors as exc:
        session.rollback()
        raise HTTPException(status_code=422, detail=str(exc)) from None


@contextmanager
def _flashed(request: Request, session: Session, failed: str, *errors: type[Exception]) -> Iterator[None]:
    """The same refusal from a form: nothing kept, ``failed: <why>`` shown on the next page."""
    try:
        yield
    except errors as exc:
        session.rollback()
        flash(request, "error", f"{failed}: {exc}")


@router.get("/api/operating-points", tags=["site"])
def api_points(session: DB, ctx: Ctx, user: User) -> dict[str, Any]:
    """The thresholds jobs run with now (the site's over the live bundle's) and every earlier version."""
    return _points(session, ctx)


@router.post("/api/operating-points", tags=["site"], status_code=201)
def api_set_points(body: ThresholdsIn, session: DB, ctx: Ctx, who: Admin, client: Client) -> dict[str, Any]:
    """A new version: thresholds by value, or one finding's from the labelled studies (admins)."""
    with _refused(session, OperatingPointError):
        _set(session, ctx, body, who, client)
    return _points(session, ctx)


@router.post("/api/operating-points/revert", tags=["site"], status_code=201)
def api_revert_points(body: RevertIn, session: DB, ctx: Ctx, who: Admin, client: Client) -> dict[str, Any]:
    """A new version equal to an earlier one, or to the bundle's own thresholds (admins)."""
    with _refused(session, OperatingPointError):
        _revert(session, ctx, body.to_version, who, client)
    return _points(session, ctx)


@pages.get("/operating-points", response_class=HTMLResponse)
def points_page(request: Request, session: DB, ctx: Ctx, user: User) -> HTMLResponse:
    data = _points(session, ctx)
    model = bundles.live_findings(session, ctx.settings.model_bundle)
    cases = labelled_cases(session, bundle_version=model.version)
    figures = {
        f: finding_figures(f, cases, data["thresholds"].get(f), resamples=COMPARE_RESAMPLES)
        for f in model.labels
    }
    return render(request, "site_points.html", {"p": data, "labels": model.labels, "figures": figures})


@pages.post("/operating-points")
def points_form(
    request: Request,
    session: DB,
    ctx: Ctx,
    who: Admin,
    client: Client,
    finding: Annotated[str, Form(max_length=64)],
    how: Annotated[str, Form(max_length=16)],
    value: Annotated[float, Form(ge=0.0, le=1.0)],
) -> Response:
    with _flashed(request, session, "Not changed", OperatingPointError, ValueError):
        body = (
            ThresholdsIn(thresholds={finding: value})
            if how == "value"
            else ThresholdsIn(finding=finding, target=Target(how), value=value)
        )
        version = _set(session, ctx, body, who, client)
        flash(request, "ok", f"Operating points version {version} is active.")
    return RedirectResponse("/operating-points", status_code=303)


@pages.post("/operating-points/revert")
def points_revert_form(
    request: Request,
    session: DB,
    ctx: Ctx,
    who: Admin,
    client: Client,
    to_version: Annotated[str, Form(max_length=12)] = "",
) -> Response:
    with _flashed(request, session, "Not reverted", OperatingPointError, ValueError):
        version = _revert(session, ctx, int(to_version) if to_version else None, who, client)
        flash(request, "ok", f"Operating points version {version} is active.")
    return RedirectResponse("/operating-points", status_code=303)


# ------------------------------------------------------------------------------------------- bundles


class BundleIn(BaseModel):
    path: str = Field(min_length=1, max_length=1024, description="bundle directory on the gateway")


class StatusIn(BaseModel):
    status: bundles.BundleStatus


def _bundles(session: Session, ctx: Context) -> dict[str, Any]:
    rows = bundles.all_bundles(session)
    compared = []
    for version in bundles.compare(session):
        row = next(r for r in rows if r.version == version.version)
        model = bundle_findings(Path(row.path))
        points = operating_points.effective(session, row.version, model.operating_points)
        findings = []
        for label in model.labels:
            f = finding_figures(
                label, version.cases, points.thresholds.get(label), resamples=COMPARE_RESAMPLES
            )
            findings.append(
                {
                    "finding": label,
                    "studies": f.studies,
                    "auroc": f.auroc,
                    "auroc_low": f.auroc_low,
                    "auroc_high": f.auroc_high,
                    "threshold": f.threshold,
                    "sensitivity": f.sensitivity.value,
                    "specificity": f.specificity.value,
                }
            )
        compared.append(
            {
                "version": version.version,
                "status": version.status,
                "studies": len(version.cases),
                "findings": findings,
            }
        )
    return {
        "configured": str(ctx.settings.model_bundle),
        "bundles": [
            {
                "version": r.version,
                "name": r.name,
                "path": r.path,
                "sha256": r.sha256,
                "status": r.status,
                "registered_by": r.registered_by,
                "registered_at": r.registered_at.isoformat(),
                "changed_at": r.changed_at.isoformat(),
            }
            for r in rows
        ],
        "compared": compared,
    }


def _audit_bundle(
    session: Session, who: Principal, action: str, version: str, client: str, **detail: Any
) -> None:
    actions.audit(
        session, who, action, target_type="bundle", target_id=version, detail=detail or None, client=client
    )
    session.commit()


def _register(session: Session, ctx: Context, path: str, who: Principal, client: str) -> str:
    row = bundles.register(session, Path(path), ctx.settings.model_bundle, username=who.username)
    _audit_bundle(session, who, "bundle_register", row.version, client, sha256=row.sha256)
    return row.version


def _promote(session: Session, version: str, who: Principal, client: str) -> str | None:
    new, old = bundles.promote(session, version)
    _audit_bundle(session, who, "bundle_promote", new.version, client, replaced=old.version if old else None)
    return old.version if old else None


@router.get("/api/bundles", tags=["site"])
def api_bundles(session: DB, ctx: Ctx, user: User) -> dict[str, Any]:
    """Registered bundles and each one's figures on the labelled studies (its live jobs and shadow runs)."""
    return _bundles(session, ctx)


@router.post("/api/bundles", tags=["site"], status_code=201)
def api_register_bundle(body: BundleIn, session: DB, ctx: Ctx, who: Admin, client: Client) -> dict[str, Any]:
    """Register a bundle as a candidate: from the next job it runs in shadow beside the live one (admins)."""
    with _refused(session, bundles.RegistryError):
        version = _register(session, ctx, body.path, who, client)
    return {"version": version, "status": bundles.BundleStatus.CANDIDATE}


@router.post("/api/bundles/{version}/promote", tags=["site"])
def api_promote_bundle(version: str, session: DB, who: Admin, client: Client) -> dict[str, Any]:
    """Make a candidate live, or roll back to a retired bundle; the live one retires (admins)."""
    with _refused(session, bundles.RegistryError):
        replaced = _promote(session, version, who, client)
    return {"live": version, "retired": replaced}


@router.post("/api/bundles/{version}/status", tags=["site"])
def api_bundle_status(
    version: str, body: StatusIn, session: DB, who: Admin, client: Client
) -> dict[str, Any]:
    """Retire a candidate, or make a retired bundle a candidate again (admins)."""
    with _refused(session, bundles.RegistryError):
        bundles.set_status(session, version, body.status)
        _audit_bundle(session, who, "bundle_status", version, client, status=str(body.status))
    return {"version": version, "status": body.status}


@pages.get("/bundles", response_class=HTMLResponse)
def bundles_page(request: Request, session: DB, ctx: Ctx, user: User) -> HTMLResponse:
    return render(request, "site_bundles.html", {"b": _bundles(session, ctx)})


@pages.post("/bundles")
def bundles_register_form(
    request: Request,
    session: DB,
    ctx: Ctx,
    who: Admin,
    client: Client,
    path: Annotated[str, Form(max_length=1024)],
) -> Response:
    with _flashed(request, session, "Not registered", bundles.RegistryError):
        version = _register(session, ctx, path, who, client)
        flash(
            request, "ok", f"Bundle {version} registered as a candidate: it runs in shadow from the next job."
        )
    return RedirectResponse("/bundles", status_code=303)


@pages.post("/bundles/{version}/promote")
def bundles_promote_form(request: Request, version: str, session: DB, who: Admin, client: Client) -> Response:
    with _flashed(request, session, "Not promoted", bundles.RegistryError):
        replaced = _promote(session, version, who, client)
        flash(request, "ok", f"Bundle {version} is live from the next job (replacing {replaced or 'none'}).")
    return RedirectResponse("/bundles", status_code=303)


# ------------------------------------------------------------------------------------------- drift


def _drift(session: Session, ctx: Context) -> list[WeekDrift]:
    s = ctx.settings
    bundle_dir = bundles.live_path(session, s.model_bundle)
    return drift(session, bundle_dir, datetime.now(UTC), s.drift_weeks, s.drift_psi_warn)


def _drift_json(report: list[WeekDrift], warn_at: float) -> dict[str, Any]:
    return {
        "warn_at": warn_at,
        "latest_psi": latest_psi(report),
        "weeks": [
            {
                "start": w.start.date().isoformat(),
                "jobs": w.jobs,
                "items": [vars(i) for i in w.items],
            }
            for w in report
        ],
    }


@router.get("/api/drift", tags=["site"])
def api_drift(session: DB, ctx: Ctx, user: User) -> dict[str, Any]:
    """Weekly distributions of scores and inputs against the bundle's training reference, PSI per item."""
    return _drift_json(_drift(session, ctx), ctx.settings.drift_psi_warn)


def psi_svg(report: list[WeekDrift], warn_at: float, width: int = 760, height: int = 260) -> str:
    """PSI per item over the weeks: one polyline per item, the warning level dashed."""
    items = sorted({i.item for w in report for i in w.items if i.psi is not None})
    values = [i.psi for w in report for i in w.items if i.psi is not None]
    top = max([warn_at * 1.5, *values]) if values else warn_at * 1.5
    left, bottom, right, upper = 48, height - 28, width - 150, 12

    def xy(week: int, value: float) -> tuple[float, float]:
        x = left + (right - left) * (week / max(1, len(report) - 1))
        return x, bottom - (bottom - upper) * min(value, top) / top

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" id="drift-chart" viewBox="0 0 {width} {height}" '
        f'role="img" aria-label="PSI per item and week">',
        f'<line x1="{left}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="#888"/>',
        f'<line x1="{left}" y1="{upper}" x2="{left}" y2="{bottom}" stroke="#888"/>',
    ]
    wy = xy(0, warn_at)[1]
    parts.append(
        f'<line x1="{left}" y1="{wy:.1f}" x2="{right}" y2="{wy:.1f}" '
        'stroke="#c0392b" stroke-dasharray="4 3"/>'
    )
    parts.append(f'<text x="4" y="{wy + 4:.1f}" font-size="11" fill="#c0392b">{warn_at:g}</text>')
    for n, w in enumerate(report):
        x = xy(n, 0)[0]
        parts.append(
            f'<text x="{x:.1f}" y="{height - 10}" font-size="10" text-anchor="middle">{w.start:%m-%d}</text>'
        )
    palette = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#d62728",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#7f7f7f",
        "#bcbd22",
        "#17becf",
    ]
    for k, item in enumerate(items):
        colour = palette[k % len(palette)]
        points = [
            xy(n, i.psi)
            for n, w in enumerate(report)
            for i in w.items
            if i.item == item and i.psi is not None
        ]
        coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
        parts.append(
            f'<polyline fill="none" stroke="{colour}" stroke-width="1.5" points="{coords}">'
            f"<title>{escape(item)}</title></polyline>"
        )
        parts.append(
            f'<text x="{right + 6}" y="{upper + 12 * (k + 1)}" font-size="10" fill="{colour}">'
            f"{escape(item)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


@pages.get("/drift", response_class=HTMLResponse)
def drift_page(request: Request, session: DB, ctx: Ctx, user: User) -> HTMLResponse:
    report = _drift(session, ctx)
    warn_at = ctx.settings.drift_psi_warn
    latest = next((w for w in reversed(report) if w.jobs), report[-1] if report else None)
    return render(
        request,
        "site_drift.html",
        {"report": report, "latest": latest, "warn_at": warn_at, "chart": psi_svg(report, warn_at)},
    )
