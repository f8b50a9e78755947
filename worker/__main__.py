"""``python -m worker``: the one way a worker starts (``cxr-gateway worker`` and ``serve`` run it). Builds
the runtime and the Celery app here, at start-up, from the settings (the environment and ``CXR_CONFIG``),
then runs a Celery worker on the configured queues."""

from __future__ import annotations

import logging
import os
import secrets
import socket
import sys
import warnings
from typing import TYPE_CHECKING

from service.core import task_names as names
from service.core.logging import setup_logging
from service.core.settings import Settings, load_settings
from worker.broker import EXIT_LOST, guard_restore_unacked, stopping_on_purpose
from worker.confine import confine_to_data_dir

if TYPE_CHECKING:
    from celery import Celery

log = logging.getLogger("worker")


def main(argv: list[str] | None = None) -> None:
    from celery.exceptions import SecurityWarning

    args = argv if argv is not None else sys.argv[1:]
    # --verbose (`cxr-gateway worker --verbose`): Celery's banner and its start-up INFO lines as well.
    verbose = "--verbose" in args
    args = [a for a in args if a != "--verbose"]
    settings = load_settings(os.environ.get("CXR_CONFIG") or None)
    confine_to_data_dir(settings)  # before the inference libraries are imported: they read it then
    setup_logging(settings.log_level, verbose=verbose)
    _check_queues_and_device(settings)
    app = _build(settings)
    if 0 in (os.getuid(), os.geteuid()):
        # Celery's multi-line SecurityWarning, in one line of ours (tasks only ever take JSON, never pickle).
        warnings.filterwarnings("ignore", category=SecurityWarning)
        log.warning("running as root: use an unprivileged user outside a trial (deploy/ does)")
    try:
        app.worker_main(_celery_argv(settings, args, verbose=verbose))
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


def _celery_argv(settings: Settings, args: list[str], *, verbose: bool) -> list[str]:
    # A node name of its own per process and start: several workers on one host stay apart in heartbeats
    # and pings, and a container restarted with the same pid is not mistaken for its dead predecessor.
    node = [] if {"-n", "--hostname"} & {a.split("=", 1)[0] for a in args} else ["--hostname", _node_name()]
    return [
        *([] if verbose else ["--quiet"]),  # no banner: the heartbeat's "worker registered" line says it
        "worker",
        "--loglevel",
        settings.log_level,
        "--queues",
        ",".join(settings.worker_queues),
        "--concurrency",
        str(settings.worker_concurrency),
        "--pool",
        settings.worker_pool,
        "--without-gossip",
        "--without-mingle",
        *node,
        *args,
    ]


def _check_queues_and_device(settings: Settings) -> None:
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


def _build(settings: Settings) -> Celery:
    """The runtime, its Celery app and its signal handlers (imported here: after confine_to_data_dir)."""
    from service.core.db import make_session_factory
    from worker import lifecycle
    from worker.app import make_app
    from worker.runtime import Runtime

    rt = Runtime(settings=settings, sessions=make_session_factory(settings))
    guard_restore_unacked()
    lifecycle.connect(rt)
    return make_app(rt)


def _node_name() -> str:
    return f"cxr-{os.getpid()}-{secrets.token_hex(3)}@{socket.gethostname()}"


if __name__ == "__main__":
    main()
