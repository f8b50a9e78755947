"""What every route needs: the app's context, a database session and the caller."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated

from celery import Celery
from fastapi import Depends, HTTPException, Request
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from service.admin.auth import Accounts, LoginThrottle, Principal
from service.admin.guard import client_address, principal_of
from service.admin.queries import get_job
from service.core.models import Job
from service.core.settings import Settings


@dataclass(frozen=True)
class Context:
    settings: Settings
    sessions: sessionmaker[Session]
    celery: Celery
    accounts: Accounts
    throttle: LoginThrottle
    registry: CollectorRegistry
    bundle_label: str  # model name and version, shown beside the not-for-diagnostic-use notice


def get_context(request: Request) -> Context:
    ctx = request.app.state.ctx
    assert isinstance(ctx, Context)
    return ctx


def get_session(request: Request) -> Iterator[Session]:
    with get_context(request).sessions() as session:
        yield session


def current_user(request: Request) -> Principal:
    # The Guard already refused anonymous callers; this is the second lock on the same door.
    principal = principal_of(request)
    if principal is None:
        raise HTTPException(status_code=401, detail="authentication required")
    return principal


def require_admin(request: Request) -> Principal:
    principal = current_user(request)
    if not principal.is_admin:
        raise HTTPException(status_code=403, detail="admin role required")
    return principal


def require_reviewer(request: Request) -> Principal:
    principal = current_user(request)
    if not principal.can_review:
        raise HTTPException(status_code=403, detail="reader or admin role required")
    return principal


def get_client(request: Request) -> str:
    return client_address(request.scope)


Ctx = Annotated[Context, Depends(get_context)]
DB = Annotated[Session, Depends(get_session)]
User = Annotated[Principal, Depends(current_user)]
Admin = Annotated[Principal, Depends(require_admin)]
Reviewer = Annotated[Principal, Depends(require_reviewer)]
Client = Annotated[str, Depends(get_client)]


def job_or_404(session: Session, job_id: str) -> Job:
    """The job with its study, or the 404 every job route answers for an unknown id."""
    job = get_job(session, job_id)
    if job is None:
        raise HTTPException(status_code=404, detail="job not found")
    return job
