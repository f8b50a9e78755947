"""Accounts, login form, sessions, throttling and the start-up rule (no user, no dashboard)."""

from __future__ import annotations

import base64
import json
import os
import stat
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlalchemy.orm import Session, sessionmaker

from service.admin.app import NoUsersError, create_app
from service.admin.auth import Accounts, LoginThrottle, hash_password, is_loopback, session_secret
from service.cli import _one_time_admin, main
from service.core.settings import DashboardUser, Settings, load_settings
from tests.unit.admin.conftest import ADMIN, HASHED_ADMIN, VIEWER, csrf_of, login


def _form_login(client: TestClient, username: str, password: str, next: str = "/") -> int:
    token = csrf_of(client.get("/login").text)
    data = {"username": username, "password": password, "csrf_token": token, "next": next}
    return client.post("/login", data=data).status_code


def test_anonymous_visitor_gets_the_login_form(anon: TestClient) -> None:
    r = anon.get("/?status=done")
    assert r.status_code == 303 and r.headers["location"] == "/login?next=%2F%3Fstatus%3Ddone"
    page = anon.get(r.headers["location"]).text
    assert 'name="password"' in page and "not for diagnostic use" in page
    assert 'value="/?status=done"' in page


def test_login_logout_and_the_session_cookie(anon: TestClient) -> None:
    token = csrf_of(anon.get("/login").text)
    r = anon.post(
        "/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": token, "next": "/x"}
    )
    assert r.status_code == 303 and r.headers["location"] == "/x"
    cookie = r.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/" in cookie
    page = anon.get("/")
    assert page.status_code == 200 and ADMIN[0] in page.text
    csrf = csrf_of(page.text)
    assert anon.post("/logout", data={"csrf_token": csrf}).headers["location"] == "/login"
    assert anon.get("/").status_code == 303


def test_hashed_password_users_sign_in(anon: TestClient) -> None:
    assert _form_login(anon, *HASHED_ADMIN) == 303
    assert anon.get("/api/me").json() == {"username": HASHED_ADMIN[0], "role": "admin"}


def test_wrong_password_and_login_needs_its_csrf_token(anon: TestClient) -> None:
    assert _form_login(anon, ADMIN[0], "nope") == 401
    assert _form_login(anon, "nobody", "nope") == 401
    r = anon.post("/login", data={"username": ADMIN[0], "password": ADMIN[1], "csrf_token": "forged"})
    assert r.status_code == 403
    assert anon.get("/").status_code == 303


def test_open_redirect_refused(anon: TestClient) -> None:
    token = csrf_of(anon.get("/login").text)
    data = {"username": ADMIN[0], "password": ADMIN[1], "csrf_token": token, "next": "//evil.example/x"}
    assert anon.post("/login", data=data).headers["location"] == "/"


def test_tampered_session_cookie_is_anonymous(anon: TestClient) -> None:
    login(anon, ADMIN)
    value = anon.cookies["cxr_session"]
    payload = json.loads(base64.b64decode(value.split(".")[0]))
    assert payload["user"] == ADMIN[0]
    forged = base64.b64encode(json.dumps({**payload, "user": "mallory"}).encode()).decode()
    anon.cookies.set("cxr_session", forged + "." + value.split(".", 1)[1])
    assert anon.get("/").status_code == 303


def test_login_is_rate_limited_per_user_and_address(app: FastAPI, anon: TestClient) -> None:
    for _ in range(5):
        assert _form_login(anon, ADMIN[0], "wrong") == 401
    # Blocked now, even with the right password; Basic auth shares the counter.
    assert _form_login(anon, *ADMIN) == 429
    assert anon.get("/api/jobs", auth=ADMIN).status_code == 429
    assert "retry-after" in anon.get("/api/jobs", auth=ADMIN).headers
    # Another user, or the same user from another address, is not blocked.
    assert _form_login(anon, *VIEWER) == 303
    with TestClient(app, client=("10.9.8.7", 4000), follow_redirects=False) as other:
        assert _form_login(other, *ADMIN) == 303


def test_basic_auth_failures_count_too(anon: TestClient) -> None:
    for _ in range(5):
        assert anon.get("/api/jobs", auth=(ADMIN[0], "wrong")).status_code == 401
    assert anon.get("/api/jobs", auth=ADMIN).status_code == 429


def test_throttle_window_expires() -> None:
    now = [1000.0]
    throttle = LoginThrottle(3, 300, clock=lambda: now[0])
    for _ in range(3):
        throttle.failed("Alice", "1.2.3.4")
    assert throttle.retry_after("alice", "1.2.3.4") == pytest.approx(300)
    assert throttle.retry_after("alice", "5.6.7.8") == 0
    now[0] += 301
    assert throttle.retry_after("alice", "1.2.3.4") == 0


def test_accounts_check_argon2_and_bcrypt_hashes() -> None:
    users = [
        DashboardUser(username="a", password_hash=hash_password("pw-a"), role="admin"),  # type: ignore[arg-type]
        DashboardUser(
            username="b",
            password_hash=bcrypt.hashpw(b"pw-b", bcrypt.gensalt(4)).decode(),  # type: ignore[arg-type]
            role="viewer",
        ),
        DashboardUser(username="c", password="pw-c"),  # type: ignore[arg-type]
    ]
    accounts = Accounts(users)
    assert accounts.verify("a", "pw-a") == "admin" and accounts.verify("a", "pw-a") == "admin"  # cached
    assert accounts.verify("a", "pw-b") is None
    assert accounts.verify("b", "pw-b") == "viewer" and accounts.verify("b", "x" * 100) is None
    assert accounts.verify("c", "pw-c") == "viewer" and accounts.verify("c", "pw-") is None
    assert accounts.verify("nobody", "pw-a") is None
    with pytest.raises(ValueError, match="argon2 or bcrypt"):
        Accounts([DashboardUser(username="d", password_hash="md5:abc")])  # type: ignore[arg-type]


def test_user_needs_exactly_one_secret() -> None:
    with pytest.raises(ValueError):
        DashboardUser(username="x")
    with pytest.raises(ValueError):
        DashboardUser(username="x", password="a", password_hash="b")  # type: ignore[arg-type]


def test_users_come_from_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(
        "CXR_DASHBOARD_USERS", json.dumps([{"username": "u", "password": "s3cr3t-pw", "role": "admin"}])
    )
    s = load_settings(data_dir=tmp_path)
    assert s.dashboard_users[0].role == "admin"
    assert "s3cr3t-pw" not in repr(s.dashboard_users)  # SecretStr: never printed


def test_removed_user_loses_their_session(
    settings: Settings, sessions: sessionmaker[Session], browser: Callable[..., tuple[TestClient, str]]
) -> None:
    client, _ = browser(VIEWER)
    cookie = client.cookies["cxr_session"]
    # Same secret (it lives in the data dir), the viewer no longer configured.
    fewer = settings.model_copy(
        update={"dashboard_users": [u for u in settings.dashboard_users if u.username != VIEWER[0]]}
    )
    with TestClient(create_app(fewer, sessions), follow_redirects=False) as other:
        other.cookies.set("cxr_session", cookie)
        assert other.get("/").status_code == 303


def test_no_users_no_dashboard(tmp_path: Path, sessions: sessionmaker[Session]) -> None:
    with pytest.raises(NoUsersError):
        create_app(load_settings(data_dir=tmp_path, dashboard_users=[]), sessions)


def test_dashboard_command_refuses_to_start_without_users(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env["CXR_DATA_DIR"] = str(tmp_path)
    result = CliRunner().invoke(main, ["dashboard"], env={**env, "CXR_DASHBOARD_USERS": "[]"})
    assert result.exit_code == 1
    assert "refusing to start the dashboard: no users configured" in result.output


def test_serve_on_loopback_makes_a_one_time_admin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = _one_time_admin(load_settings(data_dir=tmp_path, dashboard_users=[]))
    console = capsys.readouterr().err
    password = console.split("password: ")[1].split()[0]
    (user,) = json.loads(env["CXR_DASHBOARD_USERS"])
    assert user["username"] == "admin" and user["role"] == "admin"
    assert user["password_hash"].startswith("$argon2id$") and password not in env["CXR_DASHBOARD_USERS"]
    accounts = Accounts([DashboardUser(**user)])
    assert accounts.verify("admin", password) == "admin"
    assert _one_time_admin(load_settings(data_dir=tmp_path, dashboard_users=[])) != env  # new every start


def test_serve_elsewhere_refuses_without_users(tmp_path: Path) -> None:
    import click

    with pytest.raises(click.ClickException, match=r"refusing to serve the dashboard on 0\.0\.0\.0"):
        _one_time_admin(load_settings(data_dir=tmp_path, dashboard_users=[], dashboard_host="0.0.0.0"))
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.0.0.1") and not is_loopback("gateway.local")


def test_session_secret_generated_once_private_and_reused(tmp_path: Path) -> None:
    s = load_settings(data_dir=tmp_path / "d")
    first = session_secret(s)
    path = tmp_path / "d" / "dashboard-secret"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert session_secret(s) == first and len(first) >= 32
    assert session_secret(load_settings(data_dir=tmp_path / "d", dashboard_secret="x" * 40)) == "x" * 40


def test_cross_site_writes_are_refused_even_with_basic_auth(admin: TestClient) -> None:
    r = admin.post("/api/jobs/nope/cancel", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    r = admin.post("/api/jobs/nope/cancel", headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert admin.post("/api/jobs/nope/cancel", headers={"Origin": "http://testserver"}).status_code == 404


def test_oversized_bodies_are_refused_before_parsing(admin: TestClient, settings: Settings) -> None:
    too_big = str(settings.dashboard_upload_max_bytes + 2 * 1024**2)
    r = admin.post("/api/upload", headers={"Content-Length": too_big, "Content-Type": "multipart/form-data"})
    assert r.status_code == 413


def test_health_endpoints_are_open_but_say_nothing(anon: TestClient) -> None:
    assert anon.get("/healthz").json() == {"status": "ok"}
    r = anon.get("/readyz")
    assert r.status_code == 200
    assert r.json() == {"status": "ready", "database": True, "broker": True}


def test_metrics_need_login_unless_made_public(
    settings: Settings, sessions: sessionmaker[Session], anon: TestClient, viewer: TestClient
) -> None:
    assert anon.get("/metrics").status_code == 401
    assert viewer.get("/metrics").status_code == 200
    open_settings = settings.model_copy(update={"dashboard_metrics_public": True})
    with TestClient(create_app(open_settings, sessions)) as client:
        assert "cxr_jobs" in client.get("/metrics").text
        assert client.get("/api/jobs").status_code == 401
