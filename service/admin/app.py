"""The admin dashboard: FastAPI app factory wiring the guard, sessions, pages, JSON API and metrics.

Secure by default: ``create_app`` refuses to build without at least one configured user, every route
sits behind ``guard.Guard`` (only /login, /healthz, /readyz and /static are public; /metrics too when
``dashboard_metrics_public``), and writes need the admin role and, from a browser session, a CSRF token.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import Depends, FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy.orm import Session, sessionmaker
from starlette.exceptions import HTTPException
from starlette.middleware.sessions import SessionMiddleware

from service.admin import api, health, latency, metrics, notifications, pages, pull, site_loop, site_pages
from service.admin.auth import Accounts, LoginThrottle, session_secret
from service.admin.deps import Context, get_context
from service.admin.guard import CSP, Guard, csrf_protect
from service.core.queue import make_celery
from service.core.settings import Settings

STATIC_DIR = Path(__file__).parent / "static"
VERSION = "0.1.0"


class NoUsersError(ValueError):
    """No dashboard account is configured: the dashboard does not run open."""


def create_app(settings: Settings, sessions: sessionmaker[Session]) -> FastAPI:
    accounts = Accounts(settings.dashboard_users)
    if not accounts:
        raise NoUsersError(
            "no dashboard users configured: set CXR_DASHBOARD_USERS, e.g. "
            '\'[{"username": "admin", "password_hash": "$argon2id$...", "role": "admin"}]\' '
            "(hash a password with: python -m service.admin.passwords)"
        )
    celery = make_celery(settings)
    info = health.bundle_info(settings.model_bundle)
    ctx = Context(
        settings=settings,
        sessions=sessions,
        celery=celery,
        accounts=accounts,
        throttle=LoginThrottle(
            settings.dashboard_login_max_failures, settings.dashboard_login_window_seconds
        ),
        registry=metrics.make_registry(settings, sessions, celery),
        bundle_label=" ".join(x for x in (info.name, info.version) if x)
        if info
        else "model bundle not found",
    )

    app = FastAPI(
        title="cxr-gateway",
        version=VERSION,
        description="Chest X-ray AI gateway dashboard API. AI-generated results, not for diagnostic use.",
        docs_url=None,
        redoc_url=None,
        dependencies=[Depends(csrf_protect)],
    )
    app.state.ctx = ctx
    app.state.settings = settings
    app.state.sessions = sessions

    # Added innermost first: the session cookie is decoded before the Guard looks for a user.
    app.add_middleware(
        Guard,
        accounts=accounts,
        throttle=ctx.throttle,
        extra_public={"/metrics"} if settings.dashboard_metrics_public else (),
        max_body=settings.dashboard_upload_max_bytes + 1024**2,
    )
    app.add_middleware(
        SessionMiddleware,
        secret_key=session_secret(settings),
        session_cookie="cxr_session",
        max_age=settings.dashboard_session_minutes * 60,
        same_site="strict",
        https_only=settings.dashboard_cookie_secure,
    )

    app.include_router(api.router)
    app.include_router(pages.router)
    app.include_router(notifications.router)
    app.include_router(latency.router)
    app.include_router(site_pages.router)
    app.include_router(site_pages.pages)
    app.include_router(site_loop.router)
    app.include_router(site_loop.pages)
    app.include_router(pull.router)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    _add_health_routes(app)
    _add_docs(app)
    _add_error_pages(app)
    return app


def _add_health_routes(app: FastAPI) -> None:
    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """Liveness: the process answers. Open to anyone; says nothing else."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        """Readiness: the database and the broker answer. Open to anyone; no names, hosts or errors."""
        ctx = get_context(request)
        checks = {
            "database": health.database_ok(ctx.sessions),
            "broker": health.broker_ok(ctx.celery),
        }
        ready = all(checks.values())
        body = {"status": "ready" if ready else "not ready", **checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["health"], response_class=Response)
    def prometheus_metrics(request: Request) -> Response:
        """Prometheus metrics: jobs and deliveries by status, stage latency histograms, queue depth."""
        return Response(metrics.render(get_context(request).registry), media_type=CONTENT_TYPE_LATEST)


def _add_docs(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, description=app.description, routes=app.routes
            )
            schema.setdefault("components", {})["securitySchemes"] = {
                "basic": {"type": "http", "scheme": "basic"}
            }
            schema["security"] = [{"basic": []}]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]

    # Swagger UI 5 (OpenAPI 3.1) from the fastapi-offline wheel's files, not a CDN: hospitals are offline.
    html = get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="cxr-gateway API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon.png",
    ).body
    text = bytes(html).decode()
    # Swagger UI needs its own inline bootstrap script: allow exactly that script by hash.
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'"
        for s in re.findall(r"<script>(.*?)</script>", text, flags=re.S)
    )
    docs_csp = (
        f"default-src 'self'; script-src 'self' {hashes}; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
    assets = Path(fastapi_offline.__file__).parent / "static"
    served = {"swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"}

    @app.get("/docs", include_in_schema=False)
    def docs() -> HTMLResponse:
        return HTMLResponse(text, headers={"Content-Security-Policy": docs_csp})

    @app.get("/docs/assets/{name}", include_in_schema=False)
    def docs_asset(name: str) -> FileResponse:
        if name not in served:  # only these three files of the wheel
            raise HTTPException(status_code=404)
        return FileResponse(assets / name)


def _add_error_pages(app: FastAPI) -> None:
    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        path = request.url.path
        if path.startswith("/api/") or path in {"/openapi.json", "/metrics"}:
            return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return pages.render(
            request,
            "error.html",
            {"status": exc.status_code, "detail": exc.detail},
            status_code=exc.status_code,
        )


__all__ = ["CSP", "NoUsersError", "create_app"]
