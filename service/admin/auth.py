"""Dashboard accounts: password checks (argon2, bcrypt), login throttling and the session-signing secret."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from service.core.settings import DashboardUser, Settings

log = logging.getLogger("cxr_gateway.admin")

# viewer: reads; reader (radiologist): also finding feedback and reference labels; admin: everything.
Role = Literal["admin", "reader", "viewer"]
_HASHER = PasswordHasher()
_BCRYPT_PREFIXES = ("$2a$", "$2b$", "$2y$")
# A file name, not a secret (bandit B105).
SECRET_FILE = "dashboard-secret"  # nosec B105


@dataclass(frozen=True)
class Principal:
    """Who is asking, and how they proved it: a login session (needs CSRF tokens) or HTTP Basic."""

    username: str
    role: Role
    via: Literal["session", "basic"]

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def can_review(self) -> bool:
        """May record finding feedback and import reference labels."""
        return self.role in ("admin", "reader")


def hash_password(password: str) -> str:
    """An argon2id hash for ``CXR_DASHBOARD_USERS`` (``python -m service.admin.passwords``)."""
    return _HASHER.hash(password)


def _check_hash(stored: str, password: str) -> bool:
    if stored.startswith("$argon2"):
        try:
            return _HASHER.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
    if stored.startswith(_BCRYPT_PREFIXES):
        try:
            return bcrypt.checkpw(password.encode(), stored.encode())
        except ValueError:  # bcrypt refuses passwords over 72 bytes
            return False
    return False


def is_loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class Accounts:
    """The configured users; verifies passwords, remembering recent successes for HTTP Basic clients.

    API clients send Basic credentials on every call; argon2 costs ~50 ms of CPU each time, so a success
    is cached for a few minutes under an HMAC of the credentials with a per-process key.
    """

    CACHE_SECONDS = 300.0
    CACHE_SIZE = 256

    def __init__(self, users: Sequence[DashboardUser], clock: Callable[[], float] = time.monotonic) -> None:
        self._users = {u.username: u for u in users}
        for user in users:
            if user.password_hash is not None:
                stored = user.password_hash.get_secret_value()
                if not stored.startswith(("$argon2", *_BCRYPT_PREFIXES)):
                    raise ValueError(
                        f"dashboard user {user.username!r}: password_hash is not argon2 or bcrypt"
                    )
            else:
                log.warning(
                    "dashboard user %s has a plain-text password; prefer password_hash", user.username
                )
        self._clock = clock
        self._key = secrets.token_bytes(32)
        self._ok: dict[bytes, float] = {}
        self._lock = threading.Lock()
        # Unknown names still pay for one hash check, so timing does not reveal which names exist.
        self._dummy = _HASHER.hash(secrets.token_urlsafe(16))

    def __bool__(self) -> bool:
        return bool(self._users)

    def role_of(self, username: str) -> Role | None:
        user = self._users.get(username)
        return user.role if user is not None else None

    def verify(self, username: str, password: str) -> Role | None:
        """The user's role if the password is right, else None."""
        user = self._users.get(username)
        if user is None:
            _check_hash(self._dummy, password)
            return None
        if user.password is not None:
            ok = hmac.compare_digest(password.encode(), user.password.get_secret_value().encode())
            return user.role if ok else None
        assert user.password_hash is not None
        stored = user.password_hash.get_secret_value()
        key = hmac.new(self._key, f"{username}\0{password}\0{stored}".encode(), hashlib.sha256).digest()
        now = self._clock()
        with self._lock:
            if self._ok.get(key, 0.0) > now:
                return user.role
        if not _check_hash(stored, password):
            return None
        with self._lock:
            if len(self._ok) >= self.CACHE_SIZE:
                self._ok = {k: t for k, t in self._ok.items() if t > now}
                if len(self._ok) >= self.CACHE_SIZE:
                    self._ok.clear()
            self._ok[key] = now + self.CACHE_SECONDS
        return user.role


class LoginThrottle:
    """At most ``max_failures`` wrong passwords per (username, client address) in ``window`` seconds.

    In memory, per dashboard process: enough to stop guessing at one process; replicas each count.
    """

    MAX_KEYS = 10_000

    def __init__(self, max_failures: int, window: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_failures = max_failures
        self.window = window
        self._clock = clock
        self._failures: dict[tuple[str, str], deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, key: tuple[str, str], now: float) -> deque[float]:
        times = self._failures.get(key, deque())
        while times and times[0] <= now - self.window:
            times.popleft()
        return times

    def retry_after(self, username: str, address: str) -> float:
        """Seconds until this pair may try again; 0 when it may try now."""
        key = (username.lower(), address)
        now = self._clock()
        with self._lock:
            times = self._recent(key, now)
            if len(times) < self.max_failures:
                return 0.0
            return max(1.0, times[0] + self.window - now)

    def failed(self, username: str, address: str) -> None:
        key = (username.lower(), address)
        now = self._clock()
        with self._lock:
            if key not in self._failures and len(self._failures) >= self.MAX_KEYS:
                # Forget the stalest pairs rather than grow without bound under a spray of names.
                for stale in [k for k, t in self._failures.items() if not t or t[-1] <= now - self.window]:
                    del self._failures[stale]
                if len(self._failures) >= self.MAX_KEYS:
                    self._failures.pop(next(iter(self._failures)))
            times = self._recent(key, now)
            times.append(now)
            self._failures[key] = times

    def succeeded(self, username: str, address: str) -> None:
        with self._lock:
            self._failures.pop((username.lower(), address), None)


def session_secret(settings: Settings) -> str:
    """CXR_DASHBOARD_SECRET, or one generated once into the data dir (mode 0600) and reused."""
    if settings.dashboard_secret is not None:
        return settings.dashboard_secret.get_secret_value()
    path = Path(settings.data_dir) / SECRET_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{SECRET_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(48) + "\n")
        try:
            # link() never replaces: when two processes race, both end up reading the winner's secret.
            os.link(tmp, path)
            log.info("generated the dashboard session secret in %s", path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    secret = path.read_text().strip()
    if len(secret) < 32:
        raise ValueError(f"{path} holds no usable secret; delete it to generate a new one")
    return secret
