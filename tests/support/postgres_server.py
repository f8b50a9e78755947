"""A private PostgreSQL cluster a test may restart mid-flow (the shared test server is never touched).

As root the cluster runs as the ``postgres`` user (initdb refuses root), in a directory of its own under
the system temp dir that this user can write.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from tests.support.net import free_port, wait_for_port


def pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: p.parts[-3])
    return found[-1].parent if found else None


class PostgresServer:
    def __init__(self) -> None:
        bindir = pg_bin()
        assert bindir is not None, "PostgreSQL server binaries not installed"
        self.bin = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cxr-faults-pg-"))
        self.user = "postgres" if os.getuid() == 0 else None
        if self.user:
            shutil.chown(self.dir, self.user)

    @property
    def data(self) -> Path:
        return self.dir / "data"

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        cmd = [*(["runuser", "-u", self.user, "--"] if self.user else []), *args]
        return subprocess.run(cmd, cwd="/", capture_output=True, text=True, check=check, timeout=120)

    def url(self, dbname: str = "cxr", driver: str = "psycopg") -> str:
        return f"postgresql+{driver}://postgres@127.0.0.1:{self.port}/{dbname}"

    def start(self) -> PostgresServer:
        if not self.data.exists():
            self._run(
                str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust", "-E", "UTF8"
            )
            with (self.data / "postgresql.conf").open("a") as conf:
                conf.write(
                    f"port = {self.port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n"
                    "max_connections = 200\n"
                )
            self._pg_ctl("start")
            self._run(
                str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "cxr"
            )
        else:
            self._pg_ctl("start")
        return self

    def _pg_ctl(self, action: str, *extra: str) -> None:
        log = str(self.dir / "postgres.log")
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", log, "-w", "-t", "60", action, *extra)
        if action in {"start", "restart"}:
            wait_for_port("127.0.0.1", self.port, timeout=60)

    def stop(self, mode: str = "fast") -> None:
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast") -> None:
        """``pg_ctl restart``: every client connection is cut, the server is back seconds later."""
        self._pg_ctl("restart", "-m", mode)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)
