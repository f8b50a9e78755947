"""Shared fixtures: REAL peers only (Orthanc, PostgreSQL, Redis, ../shared data), no mocks.

Missing infrastructure skips a test on a developer's machine but FAILS it under CI (env CI=true), so a
broken CI image can never turn into a silently green run.
"""

from __future__ import annotations

import os
import secrets
import sys
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# tests/ has no __init__.py, so pytest only puts tests/ itself on sys.path; the repo root makes
# `tests.support.*` importable however pytest is launched (`pytest`, `python -m pytest`, from any cwd).
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.peers import PEERS, in_ci, install_hint, missing_peers, require_peer, unavailable  # noqa: E402
from tests.support.redis_db import REDIS_HOST, REDIS_PORT, claimed_db, lock_client  # noqa: E402

__all__ = ["SHARED_DIR", "in_ci", "unavailable"]

SHARED_DIR = REPO_ROOT.parent / "shared"

# Admin connection used only to CREATE/DROP throw-away databases (trust auth on 127.0.0.1).
POSTGRES_ADMIN_URL = os.environ.get(
    "CXR_TEST_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/test"
)


# ---------------------------------------------------------------------------------------------- hooks


def _missing_peers_line() -> str | None:
    missing = missing_peers()
    if not missing:
        return None
    names = "; ".join(f"{name} ({PEERS[name].what})" for name in missing)
    return f"missing peers: {names}. Install: {install_hint(missing)}"


def pytest_sessionstart(session: pytest.Session) -> None:
    # Under CI a missing peer is a broken machine: one message, not one failure per test that needs it.
    line = _missing_peers_line()
    if line and in_ci():
        pytest.exit(
            f"{line} (CI=true: missing infrastructure is an error)", returncode=pytest.ExitCode.USAGE_ERROR
        )


def pytest_report_header(config: pytest.Config) -> str | None:
    line = _missing_peers_line()
    return f"{line}; tests that need them are skipped" if line else None


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: pytest.Config) -> None:
    line = _missing_peers_line()
    if line:
        terminalreporter.write_sep("=", "missing peers", yellow=True)
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # A test that uses the fixture needs the service, marked or not: keeps `-m "not postgres"` honest.
    for item in items:
        names = getattr(item, "fixturenames", ())
        if "postgres_url" in names:
            item.add_marker(pytest.mark.postgres)
        if "redis_url" in names:
            item.add_marker(pytest.mark.redis)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    # On failure, show what Orthanc said: most PACS-side failures are only explained in its log.
    if report.failed and report.when in {"setup", "call"}:
        servers: dict[int, OrthancServer] = {}
        for value in getattr(item, "funcargs", {}).values():
            for server in value.servers if isinstance(value, _OrthancFactory) else [value]:
                if isinstance(server, OrthancServer):
                    servers[id(server)] = server  # `orthanc` is also in `orthanc_factory`: once each
        for server in servers.values():
            report.sections.append((f"Orthanc log {server.log_path}", server.log_tail(80)))
    return report


# ---------------------------------------------------------------------------------------------- data


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """../shared beside the repo (real DICOM and NIH images); skipped (failed in CI) when absent."""
    if not SHARED_DIR.is_dir():
        unavailable(
            f"shared data directory {SHARED_DIR} is absent (it must sit beside the repo as ../shared)"
        )
    return SHARED_DIR


# ---------------------------------------------------------------------------------------------- Orthanc


class _OrthancFactory:
    """Callable that starts configured OrthancServers and remembers them for teardown/logging."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.servers: list[OrthancServer] = []

    def __call__(self, **kwargs: Any) -> OrthancServer:
        kwargs.setdefault("workdir", self.base / f"orthanc-{len(self.servers)}")
        server = OrthancServer(**kwargs)
        self.servers.append(server)
        return server.start()

    def stop_all(self) -> None:
        # Background stop: the work dir is pytest's and nothing else uses these random ports.
        for server in reversed(self.servers):
            server.stop(wait=False)


@pytest.fixture
def orthanc_factory(tmp_path: Path) -> Iterator[Callable[..., OrthancServer]]:
    """`orthanc_factory(aet=..., modalities={name: [aet, host, port]}, extra_config=...)` -> started server.

    Work dirs live under tmp_path (kept by pytest for post-mortems); all servers stop at teardown.
    """
    require_peer("orthanc")
    factory = _OrthancFactory(tmp_path)
    try:
        yield factory
    finally:
        factory.stop_all()


@pytest.fixture
def orthanc(orthanc_factory: Callable[..., OrthancServer]) -> OrthancServer:
    """A fresh, empty Orthanc (AET "ORTHANC") on free ports; add peers with `.add_modality(...)`."""
    return orthanc_factory()


# ---------------------------------------------------------------------------------------------- PostgreSQL


def _with_database(url: str, dbname: str, *, driver: str | None = None) -> str:
    parts = urllib.parse.urlsplit(url)
    scheme = f"postgresql+{driver}" if driver else parts.scheme
    return urllib.parse.urlunsplit((scheme, parts.netloc, f"/{dbname}", "", ""))


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A brand-new empty database; yields its SQLAlchemy URL (postgresql+psycopg://...), dropped after."""
    import psycopg
    from psycopg import sql

    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL}: {exc}")
    name = f"cxr_test_{secrets.token_hex(6)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield _with_database(POSTGRES_ADMIN_URL, name, driver="psycopg")
        finally:
            # FORCE (PG >= 13): a pool the test forgot to dispose must not leave the database behind.
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


# ---------------------------------------------------------------------------------------------- Redis


@pytest.fixture
def redis_url() -> Iterator[str]:
    """An empty Redis logical DB (5..14) claimed for this test alone; FLUSHDB before and after."""
    import redis

    lock = lock_client()
    try:
        lock.ping()
    except redis.RedisError as exc:
        unavailable(f"Redis not reachable at {REDIS_HOST}:{REDIS_PORT}: {exc}")
    try:
        with claimed_db(lock, pytest.fail) as url:
            yield url
    finally:
        lock.close()
