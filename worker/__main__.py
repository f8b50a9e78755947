"""``python -m worker``: start a Celery worker on the inference and delivery queues."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import warnings

from service.core import task_names as names
from worker.broker import EXIT_LOST, stopping_on_purpose

log = logging.getLogger("worker")


def main(argv: list[str] | None = None) -> None:
    from celery.exceptions import SecurityWarning

    from service.core.logging import setup_logging
    from worker.app import app, settings

    args = argv if argv is not None else sys.argv[1:]
    # --verbose (`cxr-gateway worker --verbose`): Celery's banner and its start-up INFO lines as well.
    verbose = "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    if verbose:
        setup_logging(settings.log_level, verbose=True)
    known = {names.INFERENCE_QUEUE, names.DELIVERY_QUEUE}
    unknown = set(settings.worker_queues) - known
    if unknown:
        raise SystemExit(f"unknown worker queue(s) {sorted(unknown)}; known: {sorted(known)}")
    if names.INFERENCE_QUEUE in settings.worker_queues:
        from worker.inference.predictor import resolve_device

        try:  # a GPU worker without its GPU should not start (and fail every job), but say why
            resolve_device(settings.inference_device)
        except ValueError as exc:
            raise SystemExit(f"cxr-gateway worker: {exc}") from exc
    queues = ",".join(settings.worker_queues)
    # A node name of its own per process and start: several workers on one host stay apart in heartbeats
    # and pings, and a container restarted with the same pid is not mistaken for its dead predecessor.
    node = [] if {"-n", "--hostname"} & {a.split("=", 1)[0] for a in args} else ["--hostname", _node_name()]
    if 0 in (os.getuid(), os.geteuid()):
        # Celery's multi-line SecurityWarning, in one line of ours (tasks only ever take JSON, never pickle).
        warnings.filterwarnings("ignore", category=SecurityWarning)
        log.warning("running as root: use an unprivileged user outside a trial (deploy/ does)")
    argv = [
        *([] if verbose else ["--quiet"]),  # no banner: the heartbeat's "worker registered" line says it
        "worker",
        "--loglevel",
        settings.log_level,
        "--queues",
        queues,
        "--concurrency",
        str(settings.worker_concurrency),
        "--pool",
        settings.worker_pool,
        "--without-gossip",
        "--without-mingle",
        *node,
        *args,
    ]
    try:
        app.worker_main(argv)
    except SystemExit as exc:
        code = exc.code
    else:
        code = 0
    if not stopping_on_purpose.is_set() and code in (0, None):
        # Ended without a stop signal (its broker gone for good): a supervisor must start it again, and
        # only a non-zero status makes every supervisor (systemd's Restart=on-failure too) do that.
        log.error("worker ended without a stop request; exit status %d", EXIT_LOST)
        raise SystemExit(EXIT_LOST)
    raise SystemExit(code)


def _node_name() -> str:
    return f"cxr-{os.getpid()}-{secrets.token_hex(3)}@{socket.gethostname()}"


if __name__ == "__main__":
    main()
