"""Secure by default: every request is authenticated here unless its path is explicitly public.

``Guard`` is ASGI middleware in front of every route (OpenAPI docs included), so a new route cannot
slip through unauthenticated: it resolves the caller (login session or HTTP Basic), refuses
anonymous callers (303 to the login form for pages, 401 for the API), refuses viewers on anything
that changes state (403), refuses cross-origin writes, throttles password guessing and adds the
security headers to every response. ``csrf_protect`` (a dependency on every route) checks the
per-session token of cookie-authenticated writes.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
import secrets
from collections.abc import Collection
from typing import Any
from urllib.parse import quote, urlsplit

import anyio.to_thread
from fastapi import HTTPException, Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.admin.auth import Accounts, LoginThrottle, Principal

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# Pages with inline content need nothing else: scripts and styles come from /static only.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# Routes anyone may call. tests/unit/admin/test_route_security.py pins this set.
PUBLIC_PATHS = frozenset({"/login", "/healthz", "/readyz"})
PUBLIC_PREFIXES = ("/static/",)
# Writes a viewer may make (ending their own session).
ANY_ROLE_WRITES = frozenset({"/logout"})
# Writes a reader may make too (service.admin.site_pages): finding feedback, reference-label imports.
REVIEW_WRITES = re.compile(r"/(api/)?(jobs/[0-9a-f]{32}/feedback|labels)")
# Machine-facing paths answer 401; the rest are pages and redirect to the login form.
_API_PREFIXES = ("/api/",)
_API_PATHS = frozenset({"/openapi.json", "/metrics"})


def principal_of(request: Request) -> Principal | None:
    principal = getattr(request.state, "principal", None)
    return principal if isinstance(principal, Principal) else None


def client_address(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


def csrf_token(request: Request) -> str:
    """This session's CSRF token (created on first use); forms carry it as ``csrf_token``."""
    token = request.session.get("csrf")
    if not isinstance(token, str):
        token = secrets.token_urlsafe(32)
        request.session["csrf"] = token
    return token


async def csrf_protect(request: Request) -> None:
    """Writes from a login session must carry the session's token (form field or X-CSRF-Token header).

    HTTP Basic callers are exempt: a browser never attaches those credentials on its own, and the Guard
    already refuses cross-origin writes.
    """
    if request.method in SAFE_METHODS:
        return
    principal = principal_of(request)
    if principal is not None and principal.via == "basic":
        return
    expected = request.session.get("csrf")
    supplied: Any = request.headers.get("x-csrf-token")
    content_type = request.headers.get("content-type", "")
    if supplied is None and content_type.startswith(("application/x-www-form-urlencoded", "multipart/")):
        supplied = (await request.form()).get("csrf_token")
    if not (isinstance(expected, str) and isinstance(supplied, str)) or not hmac.compare_digest(
        expected.encode(), supplied.encode()
    ):
        raise HTTPException(status_code=403, detail="CSRF token missing or invalid; reload the page")


class Guard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        accounts: Accounts,
        throttle: LoginThrottle,
        extra_public: Collection[str] = (),
        max_body: int = 64 * 1024**2,
    ) -> None:
        self.app = app
        self.max_body = max_body
        self.accounts = accounts
        self.throttle = throttle
        self.public = PUBLIC_PATHS | frozenset(extra_public)

    def is_public(self, path: str) -> bool:
        return path in self.public or path.startswith(PUBLIC_PREFIXES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        method: str = scope["method"]
        send = _with_security_headers(send, static=path.startswith(PUBLIC_PREFIXES))
        headers = Headers(scope=scope)

        principal: Principal | None = None
        authorization = headers.get("authorization")
        if authorization is not None and authorization[:6].lower() == "basic ":
            credentials = _basic(authorization)
            if credentials is None:
                await _respond(send, 401, "malformed Basic credentials", basic=True)
                return
            username, password = credentials
            address = client_address(scope)
            wait = self.throttle.retry_after(username, address)
            if wait:
                await _respond(send, 429, "too many failed logins; try later", retry_after=wait)
                return
            role = await anyio.to_thread.run_sync(self.accounts.verify, username, password)
            if role is None:
                self.throttle.failed(username, address)
                await _respond(send, 401, "wrong username or password", basic=True)
                return
            self.throttle.succeeded(username, address)
            principal = Principal(username, role, "basic")
        else:
            session = scope.get("session") or {}
            user = session.get("user")
            # The role comes from the configuration, not the cookie: removing a user ends their sessions.
            role = self.accounts.role_of(user) if isinstance(user, str) else None
            if isinstance(user, str) and role is not None:
                principal = Principal(user, role, "session")
        scope.setdefault("state", {})["principal"] = principal

        if method not in SAFE_METHODS and not _same_origin(headers):
            await _respond(send, 403, "cross-origin request refused")
            return
        # Bodies are parsed (multipart spooled to disk) before any route runs: bound them here.
        length = headers.get("content-length")
        if length is None and "chunked" in headers.get("transfer-encoding", "").lower():
            await _respond(send, 411, "Content-Length required")
            return
        if length is not None and (not length.isdigit() or int(length) > self.max_body):
            await _respond(send, 413, "request body too large")
            return
        if not self.is_public(path):
            if principal is None:
                if method in {"GET", "HEAD"} and not _is_api(path):
                    query = scope.get("query_string", b"").decode("latin-1")
                    target = path + (f"?{query}" if query else "")
                    await _redirect(send, f"/login?next={quote(target, safe='')}")
                else:
                    await _respond(send, 401, "authentication required", basic=True)
                return
            reviewing = principal.can_review and REVIEW_WRITES.fullmatch(path) is not None
            if (
                method not in SAFE_METHODS
                and not principal.is_admin
                and path not in ANY_ROLE_WRITES
                and not reviewing
            ):
                await _respond(send, 403, "admin role required")
                return
        await self.app(scope, receive, send)


def _is_api(path: str) -> bool:
    return path.startswith(_API_PREFIXES) or path in _API_PATHS


def _basic(value: str) -> tuple[str, str] | None:
    try:
        decoded = base64.b64decode(value[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    return (username, password) if sep else None


def _same_origin(headers: Headers) -> bool:
    """False when a browser says the request comes from another site (Origin or Sec-Fetch-Site)."""
    site = headers.get("sec-fetch-site")
    if site is not None:
        # Browsers set it themselves; unlike Origin vs Host it also holds behind a Host-rewriting proxy.
        return site in {"same-origin", "none"}
    origin = headers.get("origin")
    if origin is None or origin == "null":
        return origin is None
    return urlsplit(origin).netloc.lower() == headers.get("host", "").lower()


def _with_security_headers(send: Send, *, static: bool) -> Send:
    async def wrapped(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            headers.setdefault("Content-Security-Policy", CSP)
            headers.setdefault("X-Frame-Options", "DENY")
            headers.setdefault("X-Content-Type-Options", "nosniff")
            headers.setdefault("Referrer-Policy", "no-referrer")
            headers.setdefault("Cross-Origin-Opener-Policy", "same-origin")
            headers.setdefault("Cross-Origin-Resource-Policy", "same-origin")
            headers.setdefault("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
            # Pages show patient-related results: never kept in a browser or proxy cache.
            headers["Cache-Control"] = "private, max-age=300" if static else "no-store"
        await send(message)

    return wrapped


async def _respond(
    send: Send, status: int, detail: str, *, basic: bool = False, retry_after: float | None = None
) -> None:
    headers = [(b"content-type", b"application/json")]
    if basic:
        headers.append((b"www-authenticate", b'Basic realm="cxr-gateway", charset="UTF-8"'))
    if retry_after is not None:
        headers.append((b"retry-after", str(int(retry_after + 0.999)).encode()))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": json.dumps({"detail": detail}).encode()})


async def _redirect(send: Send, location: str) -> None:
    headers = [(b"location", location.encode("latin-1")), (b"content-length", b"0")]
    await send({"type": "http.response.start", "status": 303, "headers": headers})
    await send({"type": "http.response.body", "body": b""})
