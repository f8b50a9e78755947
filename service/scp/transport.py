"""pynetdicom's association server, hardened for a listener on a hospital network.

* TLS handshakes run in the connection's own thread with a deadline. pynetdicom wraps the socket in the
  accept loop with the handshake on connect, so one silent client would stall every other connection.
* Accepted sockets get a timeout: pynetdicom reads a PDU with blocking ``recv`` calls, and a peer that
  stops mid-PDU would otherwise hold its thread (and an association slot) forever.
* Every accepted connection runs under the PDU guard (service.scp.pduguard): PDUs larger than we
  advertise, DIMSE on rejected presentation contexts and the like abort the association before
  pynetdicom buffers or decodes them, and one receive budget bounds the PDU bytes of all connections.
* Connections beyond a hard cap are closed before any DICOM exchange, so a connection flood cannot
  exhaust threads; below it, pynetdicom's ``maximum_associations`` answers extra associations with a
  transient A-ASSOCIATE-RJ (local limit exceeded).
"""

from __future__ import annotations

import logging
import socket
import socketserver
import ssl
import sys
import threading
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from service.core.status import ReasonCode
from service.scp.pduguard import GuardedSSLSocket, GuardLimits, guard
from service.scp.safelog import log_failure

log = logging.getLogger(__name__)


class GatewayAssociationServer(ThreadedAssociationServer):
    def __init__(
        self,
        *args: Any,
        handshake_timeout: float = 30.0,
        socket_timeout: float | None = 60.0,
        max_connections: int = 64,
        guard_limits: GuardLimits | None = None,
        **kwargs: Any,
    ) -> None:
        self.handshake_timeout = handshake_timeout
        self.guard_limits = guard_limits
        self.socket_timeout = socket_timeout
        self.max_connections = max_connections
        # Connections not yet handed to an association thread (accepted, in TLS handshake, negotiating).
        self._connections = 0
        self._connections_lock = threading.Lock()
        self._local = threading.local()
        super().__init__(*args, **kwargs)
        if self.ssl_context is not None and guard_limits is not None:
            # The public hook for the class wrap_socket returns: TLS connections get the guard too.
            self.ssl_context.sslsocket_class = GuardedSSLSocket
        # pynetdicom fires EVT_CONN_OPEN in our request thread just before it starts the association's own
        # thread: from then on that thread counts (ae.active_associations), so the slot is handed over.
        self.bind(evt.EVT_CONN_OPEN, self._handed_over)

    def shutdown(self) -> None:
        """Stop accepting and close the listening socket; open associations go on.

        The listener starts this server itself (``AE.start_server`` cannot take a server class), so the AE
        does not list it, and pynetdicom's own ``shutdown`` would look for it there.
        """
        socketserver.BaseServer.shutdown(self)
        self.server_close()

    # Runs in the accept loop: must never block.
    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None
        client, address = self.socket.accept()
        if self.ssl_context:
            client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
        if self.guard_limits is not None:
            # Below pynetdicom: it reads and buffers PDUs by their announced length (service.scp.pduguard).
            client = guard(client, self.guard_limits, str(address[0]))
        return client, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        with self._connections_lock:
            # pynetdicom runs each association in its own thread that outlives our request thread, so
            # count those (all servers of the AE) plus connections not handed to one yet.
            live = len(self.ae.active_associations) + self._connections
            if live >= self.max_connections:
                log.warning(
                    "connection closed reason=%s address=%s",
                    ReasonCode.TOO_MANY_CONNECTIONS,
                    client_address[0],
                )
                return False
            self._connections += 1
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release_slot()
            raise

    def _release_slot(self) -> None:
        with self._connections_lock:
            self._connections -= 1

    def _handed_over(self, event: evt.Event) -> None:
        if getattr(self._local, "pending", False):
            self._local.pending = False
            self._release_slot()

    # Runs in the connection's thread.
    def process_request_thread(self, request: Any, client_address: Any) -> None:
        self._local.pending = True
        try:
            if isinstance(request, ssl.SSLSocket):
                try:
                    request.settimeout(self.handshake_timeout)
                    request.do_handshake()
                except (OSError, ValueError) as exc:
                    # Plain DICOM on the TLS port, TLS < 1.2, no or an untrusted client certificate.
                    log.warning(
                        "TLS handshake refused reason=%s address=%s error=%s",
                        ReasonCode.TLS_HANDSHAKE_FAILED,
                        client_address[0],
                        getattr(exc, "reason", None) or type(exc).__name__,
                    )
                    self.shutdown_request(request)
                    return
            request.settimeout(self.socket_timeout)
            super().process_request_thread(request, client_address)
        finally:
            if self._local.pending:
                self._local.pending = False
                self._release_slot()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints tracebacks to stderr; keep them in the log, without exception messages.
        exc = sys.exception()
        if exc is not None:
            log_failure(log, "connection handler failed address=%s", exc, client_address[0])
