"""Every route the app has, generated from ``app.routes``: a new route cannot slip through unguarded.

Anonymous → 401 (API, writes) or 303 to the login form (pages); viewer writes → 403; cookie-session
writes without the CSRF token → 403. Only the routes pinned in PUBLIC answer anyone.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient
from starlette.routing import Mount, Route

from tests.unit.admin.conftest import ADMIN

# (method, path template) anyone may call. Changing this set is a security decision: review it.
PUBLIC = {
    ("GET", "/login"),
    ("POST", "/login"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/static"),
}
# Writes that any signed-in user may make.
ANY_ROLE_WRITES = {("POST", "/logout")}
# Reads only admins may make (patient data).
ADMIN_READS = {("GET", "/api/jobs/{job_id}/patient")}
SAMPLE = {"job_id": "0" * 32, "delivery_id": "1", "study_id": "1", "n": "0"}


def _flat(app: FastAPI) -> Iterator[tuple[object, str, set[str] | None]]:
    """(route, path, methods), looking into included routers (FastAPI >= 0.13x includes them lazily)."""
    try:
        from fastapi.routing import iter_route_contexts  # type: ignore[attr-defined]
    except ImportError:  # older FastAPI: app.routes is already flat
        for route in app.routes:
            yield route, getattr(route, "path", ""), getattr(route, "methods", None)
        return
    for rc in iter_route_contexts(app.routes):
        yield rc.original_route, rc.path, rc.methods


def routes(app: FastAPI) -> Iterator[tuple[str, str, str]]:
    """(method, template, concrete path) for every route and method, including the docs and /static."""
    for route, template, methods in _flat(app):
        if isinstance(route, Mount):
            yield "GET", template, f"{template}/app.css"
            continue
        assert isinstance(route, APIRoute | Route), route
        path = re.sub(r"{(\w+)(:\w+)?}", lambda m: SAMPLE.get(m.group(1), "x"), template)
        for method in sorted(methods or {"GET"}):
            if method != "HEAD":
                yield method, template, path


def call(client: TestClient, method: str, path: str, **kwargs: object) -> int:
    return client.request(method, path, **kwargs).status_code  # type: ignore[arg-type]


def test_the_app_has_the_routes_we_think(app: FastAPI) -> None:
    found = {(m, t) for m, t, _ in routes(app)}
    assert len(found) > 30
    for expected in [("GET", "/docs"), ("GET", "/openapi.json"), ("GET", "/metrics"), ("POST", "/upload")]:
        assert expected in found


def test_anonymous_gets_401_or_the_login_form_everywhere_but_public(app: FastAPI, anon: TestClient) -> None:
    public_seen = set()
    for method, template, path in routes(app):
        r = anon.request(method, path)
        if (method, template) in PUBLIC:
            public_seen.add((method, template))
            assert r.status_code not in {401, 303}, (method, path)
            continue
        if method == "GET" and not (path.startswith("/api/") or path in {"/openapi.json", "/metrics"}):
            assert r.status_code == 303, (method, path, r.status_code)
            assert r.headers["location"].startswith("/login?next="), (method, path)
        else:
            assert r.status_code == 401, (method, path, r.status_code)
            assert r.headers["www-authenticate"].startswith("Basic"), path
    assert public_seen == PUBLIC


def test_unknown_paths_do_not_reveal_anything_anonymously(anon: TestClient) -> None:
    assert anon.get("/api/nothing-here").status_code == 401
    assert anon.post("/nothing-here").status_code == 401


def test_viewer_gets_403_on_every_write_and_admin_reads(app: FastAPI, viewer: TestClient) -> None:
    for method, template, path in routes(app):
        if (method, template) in PUBLIC or (method, template) in ANY_ROLE_WRITES:
            continue
        status = viewer.request(method, path).status_code
        if method != "GET" or (method, template) in ADMIN_READS:
            assert status == 403, (method, path, status)
        else:
            assert status not in {401, 403}, (method, path, status)


def test_session_writes_need_the_csrf_token(
    app: FastAPI, browser: Callable[[tuple[str, str]], tuple[TestClient, str]]
) -> None:
    client, token = browser(ADMIN)
    for method, _, path in routes(app):
        if method in {"GET", "HEAD"}:
            continue
        r = client.request(method, path, data={"csrf_token": "wrong"})
        assert r.status_code == 403, (method, path, r.status_code)
        assert "CSRF" in r.text
    # Still signed in: the refusals did not touch the session.
    assert client.get("/").status_code == 200
    assert client.post("/api/jobs/nope/cancel", headers={"X-CSRF-Token": token}).status_code == 404


@pytest.mark.parametrize("path", ["/", "/api/jobs", "/login", "/static/app.css", "/healthz", "/nothing"])
def test_security_headers_everywhere(anon: TestClient, admin: TestClient, path: str) -> None:
    for client in (anon, admin):
        r = client.get(path)
        assert r.headers["x-frame-options"] == "DENY"
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["referrer-policy"] == "no-referrer"
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
        assert "script-src 'self'" in csp
        if not path.startswith("/static/"):
            assert r.headers["cache-control"] == "no-store"


def test_docs_need_login_and_allow_only_their_own_script(anon: TestClient, admin: TestClient) -> None:
    assert anon.get("/docs").status_code == 303
    assert anon.get("/openapi.json").status_code == 401
    r = admin.get("/docs")
    assert r.status_code == 200
    assert "'sha256-" in r.headers["content-security-policy"]
    assert "'unsafe-inline'" not in r.headers["content-security-policy"]
    # Offline networks: Swagger UI from our own origin, no CDN anywhere.
    assert "cdn" not in r.text and "cdn" not in r.headers["content-security-policy"]
    assert '<script src="/docs/assets/swagger-ui-bundle.js">' in r.text
    js = admin.get("/docs/assets/swagger-ui-bundle.js")
    assert js.status_code == 200 and "SwaggerUIBundle" in js.text
    assert admin.get("/docs/assets/redoc.standalone.js").status_code == 404
    assert anon.get("/docs/assets/swagger-ui.css").status_code in {303, 401}
    schema = admin.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"]["basic"]["scheme"] == "basic"
    assert "/api/jobs/{job_id}/requeue" in schema["paths"]
