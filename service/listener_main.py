"""The listener process (`cxr-gateway listener`): what it serves and runs, wired together here so that
its rooms need not know each other. The DICOM AE (service.scp) and the STOW-RS intake
(service.dicomweb, which stores through the listener's intake) on their ports; the study assembler;
and the threads that need no model: the reconciler, the notification scheduler, the pull runner, the
retention purger."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from types import FrameType
from typing import Any

from pynetdicom import AE, _config, evt
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy.orm import Session, sessionmaker

from service.core.db import make_session_factory, migrate
from service.core.queue import make_celery
from service.core.reconciler import Reconciler
from service.core.retention import Purger
from service.core.settings import Settings
from service.core.tls import server_context
from service.dicomnet.pulls import PullRunner
from service.dicomweb.stow_server import StowIntake, StowServer
from service.notify.dispatch import Scheduler as NotifyScheduler
from service.scp.ae import build_ae
from service.scp.assembler import StudyAssembler
from service.scp.backpressure import BackPressure
from service.scp.handlers import (
    AssociationStudies,
    handle_echo,
    make_association_end_handler,
    make_requested_handler,
    make_store_handler,
)
from service.scp.intake import Intake
from service.scp.pduguard import GuardLimits, ReceiveBudget
from service.scp.peers import PeerPolicy
from service.scp.transport import GatewayAssociationServer

log = logging.getLogger(__name__)


class Listener:
    """Owns the AE servers and the assembler thread; ``start``/``stop`` for tests and the CLI alike."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions or make_session_factory(settings)
        self.celery = make_celery(settings)
        self.pressure = BackPressure(settings)
        self.policy = PeerPolicy(settings.sources)
        self.studies = AssociationStudies()
        self.intake = Intake(settings, self.sessions, self.pressure)
        self.assembler = StudyAssembler(
            settings, self.sessions, self.celery, pressure=self.pressure, busy=self.studies.busy
        )
        self.reconciler = Reconciler(settings, self.sessions, self.celery)
        self.notifier = NotifyScheduler(settings, self.sessions, self.celery)
        self.pulls = PullRunner(settings, self.sessions)  # when a pull_peer is set
        self.purger = Purger(settings, self.sessions)
        self.servers: list[ThreadedAssociationServer] = []
        self.stow: StowServer | None = None  # the STOW-RS intake, when dicomweb_port is set
        self.receive_budget = ReceiveBudget(settings.listener_receive_memory_bytes)
        self.guard_limits = GuardLimits(
            max_pdu=settings.listener_max_pdu_bytes,
            max_instance_bytes=settings.max_instance_bytes,
            budget=self.receive_budget,
            budget_wait=settings.listener_network_timeout,
        )

    @property
    def staging_dir(self) -> Path:
        # Only used when chunked receive is off; the CLI points pynetdicom's temp files here too.
        return Path(tempfile.gettempdir())

    def start(self) -> None:
        self.settings.spool_dir.mkdir(parents=True, exist_ok=True)
        # Stream each C-STORE's data set to a file instead of memory (an instance can be hundreds of MB).
        # A process-wide pynetdicom switch; this process only receives through the listener.
        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = build_ae(self.settings, self.policy)
        end = make_association_end_handler(self.studies, self.assembler.touch)
        # A normal release says the sender is done: its studies go after the short release grace.
        released = make_association_end_handler(self.studies, self.assembler.release)
        handlers: list[Any] = [
            (evt.EVT_REQUESTED, make_requested_handler(self.policy)),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_C_STORE, make_store_handler(self.intake, self.policy, self.studies, self.staging_dir)),
            (evt.EVT_RELEASED, released),
            (evt.EVT_ABORTED, end),
            (evt.EVT_CONN_CLOSE, end),
        ]
        s = self.settings
        try:
            if s.listener_plaintext:
                self._serve(ae, s.listener_port, None, handlers)
            if s.listener_tls_port is not None:
                self._serve(ae, s.listener_tls_port, server_context(s), handlers)
            if s.dicomweb_port is not None:
                stow = StowIntake(s, self.intake, self.studies, self.assembler.touch, self.staging_dir)
                self.stow = StowServer(s, stow)
                self.stow.start()
        except BaseException:
            self.stop()
            raise
        self.assembler.start()
        self.reconciler.start()
        self.notifier.start()
        self.pulls.start()
        self.purger.start()
        log.info(
            "listener up ae_title=%s port=%s tls_port=%s quiet=%.1fs max_associations=%d",
            s.listener_ae_title,
            s.listener_port if s.listener_plaintext else "-",
            s.listener_tls_port or "-",
            s.study_quiet_seconds,
            s.max_associations,
        )

    def _serve(self, ae: AE, port: int, ssl_context: Any, handlers: list[Any]) -> None:
        s = self.settings
        server = ae.make_server(
            (s.listener_host, port),
            ssl_context=ssl_context,
            evt_handlers=handlers,
            server_class=GatewayAssociationServer,
            handshake_timeout=s.listener_acse_timeout,
            socket_timeout=s.listener_network_timeout,
            # Room for the transient A-ASSOCIATE-RJ to reach extra peers; beyond it, close at once.
            max_connections=2 * s.max_associations + 4,
            guard_limits=self.guard_limits,
        )
        thread = threading.Thread(target=server.serve_forever, name=f"dicom-server-{port}", daemon=True)
        thread.start()
        self.servers.append(server)

    def open_associations(self, *, established: bool = False) -> list[Any]:
        """Association threads of our servers; ``established``: only those past negotiation (a bare TCP
        probe, such as a load balancer's, also gets a thread until it times out)."""
        found = [assoc for server in self.servers for assoc in server.active_associations]
        return [a for a in found if a.is_established] if established else found

    def stop(self, drain_seconds: float = 0.0) -> int:
        """Stop accepting associations, let open ones finish for up to ``drain_seconds``, then abort
        what is left (the sender retries what it had no answer for). Returns how many were aborted."""
        for server in self.servers:
            server.shutdown()  # closes the listening socket only; open associations go on
        if self.stow is not None:
            self.stow.stop()  # after its requests in flight, up to the drain period
            self.stow = None
        deadline = time.monotonic() + drain_seconds
        open_now = self.open_associations(established=True)
        if open_now:
            log.info("listener draining open_associations=%d for up to %.0fs", len(open_now), drain_seconds)
        while open_now and time.monotonic() < deadline:
            time.sleep(0.1)
            open_now = self.open_associations(established=True)
        if open_now:
            log.warning("listener aborted associations=%d after the drain period", len(open_now))
        for assoc in self.open_associations():  # also connections that never finished negotiating
            assoc.abort()
        self.servers.clear()
        # The assembler may still queue studies whose associations just ended; the database keeps the
        # rest for the next start or another replica.
        self.assembler.stop()
        self.reconciler.stop()
        self.notifier.stop()
        self.pulls.stop()
        self.purger.stop()
        self.intake.close()
        return len(open_now)


# Files older than this under the staging area belong to no live transfer (pynetdicom writes every PDU).
STALE_STAGING_SECONDS = 3600


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _prepare_staging(settings: Settings) -> Path:
    """A staging folder on the spool's file system, so accepting an instance is a rename, not a copy.

    One folder per process: listener replicas may share the spool. Files there that nobody has touched for
    an hour were never acknowledged (the PACS sends them again) and are removed.
    """
    root = settings.spool_dir / ".incoming"
    cutoff = time.time() - STALE_STAGING_SECONDS
    for stale in root.glob("*/*"):
        with contextlib.suppress(OSError):
            if stale.is_file() and stale.stat().st_mtime < cutoff:
                stale.unlink()
    host = socket.gethostname()
    for folder in root.glob(f"{host}-*"):
        # Only folders of dead processes on this host: a replica starting beside a live listener must
        # never pull the folder from under its transfers (another host's folders are its own business).
        pid = folder.name.rsplit("-", 1)[-1]
        if pid.isdigit() and not _alive(int(pid)):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only succeeds when empty
    staging = root / f"{host}-{os.getpid()}"
    staging.mkdir(parents=True, exist_ok=True)
    # pynetdicom creates its chunked-receive files with tempfile defaults; this process is ours alone.
    tempfile.tempdir = str(staging)
    return staging


def run_listener(settings: Settings, *, run_migrations: bool = True) -> None:
    if run_migrations:
        migrate(settings)
    staging = _prepare_staging(settings)
    stopped = threading.Event()

    def _stop(signum: int, _frame: FrameType | None) -> None:
        stopped.set()

    # Before the port opens: a SIGTERM that arrives with the first association still drains it.
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    listener = Listener(settings)
    listener.start()
    # A timed wait: the kernel may hand SIGTERM to any of our threads, and Python runs the handler only
    # when the main thread next executes bytecode; an untimed wait then sleeps through it (seen: 8 s).
    while not stopped.wait(0.2):
        pass
    log.info("listener stopping")
    listener.stop(drain_seconds=settings.listener_drain_seconds)
    shutil.rmtree(staging, ignore_errors=True)
