"""Start the gateway as a user would: the ``cxr-gateway`` CLI in child processes, logs to files."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

from tests.support.net import free_port, port_open
from tests.support.waiting import wait_until

REPO_ROOT = Path(__file__).resolve().parents[2]


def first_job_delivered(jobs: list[dict[str, Any]]) -> bool:
    """For ``wait_for_jobs``: the newest job has deliveries and every one of them is delivered."""
    return bool(
        jobs and jobs[0]["deliveries"] and all(d["status"] == "delivered" for d in jobs[0]["deliveries"])
    )


class GatewayProcesses:
    """One or more ``cxr-gateway`` sub-commands sharing one environment (``serve`` or the parts)."""

    def __init__(
        self,
        workdir: Path,
        *,
        commands: Sequence[str] = ("serve",),
        destinations: Sequence[Mapping[str, Any]] = (),
        env: Mapping[str, str] | None = None,
        dashboard_users: Sequence[Mapping[str, str]] | None = None,
    ) -> None:
        """``dashboard_users``: CXR_DASHBOARD_USERS entries; by default one admin with a random password,
        which ``api``/``post`` (HTTP Basic) and ``admin`` use. ``env`` may still override it."""
        self.workdir = workdir
        self.data_dir = workdir / "data"
        self.listener_port = free_port()
        self.dashboard_port = free_port()
        self.ae_title = "CXR_GATEWAY"
        self.commands = list(commands)
        self.admin = ("admin", secrets.token_urlsafe(12))
        if dashboard_users is None:
            dashboard_users = [{"username": self.admin[0], "password": self.admin[1], "role": "admin"}]
        self.dashboard_users = [dict(u) for u in dashboard_users]
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CXR_")},
            "CXR_DATA_DIR": str(self.data_dir),
            "CXR_LISTENER_PORT": str(self.listener_port),
            "CXR_LISTENER_HOST": "127.0.0.1",
            "CXR_DASHBOARD_PORT": str(self.dashboard_port),
            "CXR_STUDY_QUIET_SECONDS": "1",
            "CXR_DESTINATIONS": json.dumps(list(destinations)),
            "CXR_DELIVERY_RETRY_BASE_SECONDS": "1",
            "CXR_TORCH_THREADS": "2",
            "CXR_DASHBOARD_USERS": json.dumps(self.dashboard_users),
            **(env or {}),
        }
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.logs: dict[str, Path] = {}

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def run_cli(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "service.cli", *args],
            env=self.env,
            cwd=self.workdir,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )

    def start(self, timeout: float = 90) -> GatewayProcesses:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if "serve" not in self.commands:
            self.run_cli("migrate")
        for name in self.commands:
            log_path = self.workdir / f"{name}.log"
            self.logs[name] = log_path
            with log_path.open("wb") as fh:
                self.procs[name] = subprocess.Popen(
                    [sys.executable, "-m", "service.cli", name],
                    env=self.env,
                    cwd=self.workdir,
                    stdout=fh,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        want_listener = {"serve", "listener"} & set(self.commands)
        want_dashboard = {"serve", "dashboard"} & set(self.commands)
        wait_until(
            lambda: (
                (not want_listener or port_open("127.0.0.1", self.listener_port))
                and (not want_dashboard or self._healthy())
            ),
            timeout,
            "the gateway started",
            interval=0.3,
            check=self._check_alive,
            detail=self.log_tail,
        )
        return self

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.dashboard_url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def _check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log_tail()}")

    def api(self, path: str, *, auth: tuple[str, str] | None = None) -> Any:
        """GET a dashboard JSON API path as the admin (HTTP Basic); raises on an error status."""
        response = httpx.get(f"{self.dashboard_url}{path}", auth=auth or self.admin, timeout=10)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, *, auth: tuple[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        """POST to the dashboard as the admin (HTTP Basic: no CSRF token needed); returns the response."""
        return httpx.post(f"{self.dashboard_url}{path}", auth=auth or self.admin, timeout=30, **kwargs)

    def wait_for_jobs(self, predicate: Any, timeout: float = 120) -> list[dict[str, Any]]:
        seen: list[list[dict[str, Any]]] = [[]]

        def matching() -> list[dict[str, Any]] | None:
            seen[0] = self.api("/api/jobs")["items"]
            return seen[0] if predicate(seen[0]) else None

        found = wait_until(
            matching,
            timeout,
            "jobs matching the predicate",
            interval=0.5,
            check=self._check_alive,
            detail=lambda: f"last jobs: {seen[0]}\n{self.log_tail()}",
        )
        assert found is not None
        return found

    def log_text(self) -> str:
        return "\n".join(
            f"--- {name} ---\n{path.read_text(errors='replace')}"
            for name, path in self.logs.items()
            if path.exists()
        )

    def log_tail(self, lines: int = 80) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self) -> None:
        # SIGTERM to each main process only, as systemd (KillMode=mixed) and Kubernetes send it: a SIGTERM
        # to the whole group also reaches Celery's pool children, and one killed while it holds the pool's
        # queue lock deadlocks the worker's own shutdown (billiard) until the SIGKILL below.
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            # Whatever is left of its process group (a worker that did not stop, its pool children).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def __enter__(self) -> GatewayProcesses:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
