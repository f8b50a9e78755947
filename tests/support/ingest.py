"""Helpers for the ingest tests: an in-process listener, a pynetdicom SCU, a throw-away PKI (openssl CLI)."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from pydicom import Dataset
from pynetdicom import AE
from pynetdicom.association import Association
from sqlalchemy import func, select

from service.core.db import make_session_factory, migrate
from service.core.models import Instance, Job
from service.core.settings import Settings, load_settings
from service.listener_main import Listener
from tests.support.net import free_port
from tests.support.peers import require_peer
from tests.support.waiting import wait_until

T = TypeVar("T")

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SR_COMPREHENSIVE_3D = "1.2.840.10008.5.1.4.1.1.88.34"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"


def ingest_settings(tmp_path: Path, **overrides: Any) -> Settings:
    """Listener settings on loopback, a free port, SQLite + filesystem broker under ``tmp_path``; migrated."""
    values: dict[str, Any] = {
        "data_dir": tmp_path / "data",
        "listener_host": "127.0.0.1",
        "listener_port": free_port(),
        "study_quiet_seconds": 0.5,
        "destinations": [],
        # Tests share a disk with other work; the watermark has its own test.
        "spool_min_free_bytes": 0,
    }
    values.update(overrides)
    settings = load_settings(**values)
    migrate(settings)
    return settings


@contextlib.contextmanager
def running_listener(settings: Settings) -> Iterator[Listener]:
    listener = Listener(settings, make_session_factory(settings))
    listener.start()
    try:
        yield listener
    finally:
        listener.stop()
        listener.sessions.kw["bind"].dispose()


def count(listener: Listener, model: Any) -> int:
    with listener.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(model)) or 0)


def instances(listener: Listener) -> list[Instance]:
    with listener.sessions() as session:
        return list(session.scalars(select(Instance).order_by(Instance.id)))


def jobs(listener: Listener) -> list[Job]:
    with listener.sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.created_at)))


def wait_for(predicate: Callable[[], T], timeout: float = 15.0, interval: float = 0.1) -> T:
    return wait_until(predicate, timeout, "condition", interval=interval)


def spool_files(settings: Settings) -> list[Path]:
    """Every file under the spool, staging area excluded."""
    return sorted(
        p
        for p in settings.spool_dir.rglob("*")
        if p.is_file() and ".incoming" not in p.relative_to(settings.spool_dir).parts
    )


# ------------------------------------------------------------------------------------- pynetdicom SCU


def scu(
    calling_aet: str = "PYNETSCU",
    contexts: list[tuple[str, list[str]]] | None = None,
    timeout: float = 20.0,
) -> AE:
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for sop_class, syntaxes in contexts or [(CR_STORAGE, [EXPLICIT_LE, IMPLICIT_LE])]:
        ae.add_requested_context(sop_class, syntaxes)
    return ae


@contextlib.contextmanager
def association(
    ae: AE, settings: Settings, *, port: int | None = None, **kwargs: Any
) -> Iterator[Association]:
    assoc = ae.associate(
        "127.0.0.1", port or settings.listener_port, ae_title=settings.listener_ae_title, **kwargs
    )
    try:
        assert assoc.is_established, "association was not accepted"
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def store_status(assoc: Association, dataset: Dataset | Path) -> int:
    status = assoc.send_c_store(dataset)
    assert status is not None and "Status" in status, "no C-STORE response"
    return int(status.Status)


# ------------------------------------------------------------------------------------- PKI


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # signed by another CA
    rogue_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


# A new P-256 key, unencrypted: every test certificate's key.
_NEW_EC_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")


def _issue(
    directory: Path, name: str, ca_cert: Path, ca_key: Path, cn: str, extensions: str
) -> tuple[Path, Path]:
    key, csr, cert, ext = (directory / f"{name}{suffix}" for suffix in (".key", ".csr", ".crt", ".ext"))
    ext.write_text(extensions)
    _openssl(
        "req",
        "-new",
        *_NEW_EC_KEY,
        "-keyout",
        key,
        "-out",
        csr,
        "-subj",
        f"/CN={cn}",
    )
    _openssl(
        "x509",
        "-req",
        "-in",
        csr,
        "-CA",
        ca_cert,
        "-CAkey",
        ca_key,
        "-CAcreateserial",
        "-days",
        "2",
        "-sha256",
        "-out",
        cert,
        "-extfile",
        ext,
    )
    return cert, key


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.crt"
    _openssl(
        "req",
        "-x509",
        *_NEW_EC_KEY,
        "-keyout",
        key,
        "-out",
        cert,
        "-days",
        "2",
        "-subj",
        f"/CN={name}",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    )
    return cert, key


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1/localhost, a client certificate, and a rogue client."""
    require_peer("openssl")
    directory.mkdir(parents=True, exist_ok=True)
    ca_cert, ca_key = _ca(directory, "test-ca")
    server_cert, server_key = _issue(
        directory,
        "server",
        ca_cert,
        ca_key,
        "cxr-gateway",
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    client_cert, client_key = _issue(
        directory, "client", ca_cert, ca_key, "pacs", "extendedKeyUsage=clientAuth\n"
    )
    rogue_ca, rogue_ca_key = _ca(directory, "rogue-ca")
    rogue_cert, rogue_key = _issue(
        directory, "rogue", rogue_ca, rogue_ca_key, "rogue", "extendedKeyUsage=clientAuth\n"
    )
    return Pki(ca_cert, server_cert, server_key, client_cert, client_key, rogue_cert, rogue_key)


# ------------------------------------------------------------------------------------- network outage


class TcpProxy:
    """A TCP forwarder to a real service (e.g. Redis) that a test can cut and restore on the same port."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = free_port()
        self._listening: socket.socket | None = None
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()

    def start(self) -> TcpProxy:
        listening = socket.create_server(("127.0.0.1", self.port))
        self._listening = listening
        threading.Thread(target=self._accept, args=(listening,), daemon=True).start()
        return self

    def _accept(self, listening: socket.socket) -> None:
        while True:
            try:
                client, _ = listening.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._conns += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Refuse new connections and drop the open ones, like a broker that went away."""
        if self._listening is not None:
            self._listening.close()
            self._listening = None
        with self._lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    def restore(self) -> None:
        self.start()
