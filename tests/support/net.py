"""Small TCP helpers for tests that start real network peers."""

from __future__ import annotations

import socket

from tests.support.waiting import wait_until


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that is free right now.

    The OS picks it (bind to port 0); there is a small race before the caller binds it, so servers started
    on it should be retried on a bind failure (OrthancServer does).
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    """True if something accepts TCP connections on host:port."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def wait_for_port(host: str, port: int, timeout: float = 30.0) -> None:
    """Block until host:port accepts TCP connections; TimeoutError after `timeout` seconds."""
    wait_until(lambda: port_open(host, port), timeout, f"something listening on {host}:{port}", interval=0.05)
