"""Pull a study from the PACS (dashboard page and ``POST /api/pull``): an admin names a Study Instance UID
or an accession number; the row is queued here and audited, and the listener's pull runner finds the
study (C-FIND) and moves it to our listener (C-MOVE), where it flows as any received study."""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Form, HTTPException, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from pydantic import BaseModel, model_validator
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.admin import actions, pages
from service.admin.auth import Principal
from service.admin.deps import DB, Admin, Client, Context, Ctx, User
from service.core import pulls
from service.core.models import Pull

router = APIRouter()
_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")


class PullIn(BaseModel):
    """Exactly one of the two keys."""

    study_instance_uid: str | None = None
    accession_number: str | None = None

    @model_validator(mode="after")
    def _one_key(self) -> PullIn:
        uid = (self.study_instance_uid or "").strip() or None
        accession = (self.accession_number or "").strip() or None
        if (uid is None) == (accession is None):
            raise ValueError("give exactly one of study_instance_uid, accession_number")
        if uid is not None and (len(uid) > 64 or not _UID.match(uid)):
            raise ValueError("study_instance_uid is not a UID")
        if accession is not None and (len(accession) > 16 or "\\" in accession or "*" in accession):
            raise ValueError("accession_number is 1-16 characters, no wildcard or backslash")
        self.study_instance_uid, self.accession_number = uid, accession
        return self


class PullOut(BaseModel):
    id: int
    requested_by: str
    study_instance_uid: str | None
    accession_number: str | None
    status: str
    studies_found: int
    instances_moved: int
    instances_failed: int
    detail: str | None
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None


def _request(ctx: Context, body: PullIn, admin: Principal, client: str) -> Pull:
    if ctx.settings.pull_peer is None:
        raise actions.ActionError(409, "no Q/R peer configured (CXR_PULL_PEER)")
    with ctx.sessions.begin() as session:
        pull = pulls.create(
            session, admin.username, study_uid=body.study_instance_uid, accession=body.accession_number
        )
        # The key asked for stays in the pull row: the audit names the pull and the kind of key only.
        key = "study_instance_uid" if body.study_instance_uid else "accession_number"
        actions.audit(
            session,
            admin,
            "pull",
            target_type="pull",
            target_id=str(pull.id),
            detail={"by": key},
            client=client,
        )
        session.expunge(pull)
        return pull


def _list(session: Session, limit: int) -> list[Pull]:
    return list(session.scalars(select(Pull).order_by(Pull.id.desc()).limit(limit)))


@router.post("/api/pull", response_model=PullOut, status_code=202, tags=["pull"])
def api_pull(body: PullIn, ctx: Ctx, admin: Admin, client: Client) -> PullOut:
    """Ask the PACS for a study (admins; audited); poll ``GET /api/pulls/{id}`` for the outcome."""
    try:
        return PullOut.model_validate(_request(ctx, body, admin, client), from_attributes=True)
    except actions.ActionError as exc:
        raise HTTPException(status_code=exc.status_code, detail=exc.detail) from exc


@router.get("/api/pulls", response_model=list[PullOut], tags=["pull"])
def api_pulls(session: DB, user: User, limit: int = 100) -> list[PullOut]:
    """Pulls, newest first: queued, running, done (instances moved), not_found or failed (a reason)."""
    return [PullOut.model_validate(p, from_attributes=True) for p in _list(session, min(max(limit, 1), 1000))]


@router.get("/api/pulls/{pull_id}", response_model=PullOut, tags=["pull"])
def api_pull_one(pull_id: int, session: DB, user: User) -> PullOut:
    pull = session.get(Pull, pull_id)
    if pull is None:
        raise HTTPException(status_code=404, detail="pull not found")
    return PullOut.model_validate(pull, from_attributes=True)


@router.get("/pulls", response_class=HTMLResponse)
def pulls_page(request: Request, ctx: Ctx, session: DB, user: User) -> HTMLResponse:
    peer = ctx.settings.pull_peer
    return pages.render(
        request,
        "pulls.html",
        {"rows": _list(session, 200), "peer": f"{peer.ae_title}@{peer.host}:{peer.port}" if peer else None},
    )


@router.post("/pulls")
def pulls_form(
    request: Request,
    ctx: Ctx,
    admin: Admin,
    client: Client,
    key: Annotated[str, Form(max_length=64)],
    kind: Annotated[str, Form(pattern="^(study_instance_uid|accession_number)$")],
) -> Response:
    try:
        body = PullIn.model_validate({kind: key})
        pull = _request(ctx, body, admin, client)
        pages.flash(request, "ok", f"Pull {pull.id} queued.")
    except ValueError as exc:
        pages.flash(request, "error", str(exc).splitlines()[-1])
    except actions.ActionError as exc:
        pages.flash(request, "error", exc.detail)
    return RedirectResponse("/pulls", status_code=303)
