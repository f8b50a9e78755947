"""``cxr-gateway``: one command for every part. ``serve`` runs them all on one machine."""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import FrameType

import click

from service.core.logging import setup_logging
from service.core.settings import Settings, load_settings

log = logging.getLogger("cxr_gateway")


def _settings(ctx: click.Context) -> Settings:
    settings = ctx.obj["settings"]
    assert isinstance(settings, Settings)
    return settings


@click.group()
@click.option(
    "--config",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    envvar="CXR_CONFIG",
    help="TOML settings file (env CXR_CONFIG); CXR_* environment variables override it.",
)
@click.pass_context
def main(ctx: click.Context, config: Path | None) -> None:
    """Chest X-ray AI gateway: DICOM listener, inference workers and admin dashboard."""
    settings = load_settings(config)
    setup_logging(settings.log_level)
    ctx.obj = {"settings": settings, "config": config.resolve() if config else None}


@main.command()
@click.pass_context
def migrate(ctx: click.Context) -> None:
    """Create or upgrade the database schema."""
    from service.core.db import migrate as run_migrate

    run_migrate(_settings(ctx))
    click.echo("database schema is up to date")


@main.command()
@click.pass_context
def listener(ctx: click.Context) -> None:
    """Run the DICOM C-STORE listener and study assembler."""
    from service.scp.server import run_listener

    run_listener(_settings(ctx))


@main.command()
@click.pass_context
def dashboard(ctx: click.Context) -> None:
    """Run the admin dashboard (HTTP)."""
    import uvicorn

    from service.admin.app import create_app
    from service.core.db import make_session_factory

    settings = _settings(ctx)
    if not settings.dashboard_users:
        # Secure by default: no account, no dashboard (only `serve` on loopback makes a one-time admin).
        raise click.ClickException(
            "refusing to start the dashboard: no users configured. Set CXR_DASHBOARD_USERS, e.g. "
            '\'[{"username": "admin", "password_hash": "$argon2id$...", "role": "admin"}]\' '
            "(python -m service.admin.passwords prints one entry)."
        )
    app = create_app(settings, make_session_factory(settings))
    uvicorn.run(app, host=settings.dashboard_host, port=settings.dashboard_port, log_config=None)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def worker(ctx: click.Context) -> None:
    """Run a Celery worker (inference and delivery queues); extra arguments go to Celery."""
    # The service package never imports the worker: start it as its own program.
    os.execv(sys.executable, [sys.executable, "-m", "worker", *ctx.args])


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def train(ctx: click.Context) -> None:
    """Model tooling (``python -m monai_train``): arguments are passed through."""
    os.execv(sys.executable, [sys.executable, "-m", "monai_train", *ctx.args])


def _child_env(ctx: click.Context) -> dict[str, str]:
    settings = _settings(ctx)
    env = dict(os.environ)
    # Children rebuild Settings from env: pin the data dir so they all agree whatever their cwd.
    env["CXR_DATA_DIR"] = str(settings.data_dir.resolve())
    if ctx.obj["config"] is not None:
        env["CXR_CONFIG"] = str(ctx.obj["config"])
    return env


def _one_time_admin(settings: Settings) -> dict[str, str]:
    """No dashboard user configured: on loopback, an admin with a password for this run only.

    The password goes to this console once (stderr, not the log) and to the dashboard only as a hash.
    Anywhere but loopback the gateway refuses to start rather than serve an open or guessable dashboard.
    """
    from service.admin.auth import hash_password, is_loopback

    if not is_loopback(settings.dashboard_host):
        raise click.ClickException(
            f"refusing to serve the dashboard on {settings.dashboard_host}: no users configured "
            "(set CXR_DASHBOARD_USERS; python -m service.admin.passwords prints an entry)"
        )
    password = secrets.token_urlsafe(15)
    users = [{"username": "admin", "password_hash": hash_password(password), "role": "admin"}]
    url = f"http://{settings.dashboard_host}:{settings.dashboard_port}"
    click.echo(
        f"\n  No dashboard users configured (CXR_DASHBOARD_USERS): a one-time admin for this run.\n"
        f"  Dashboard {url}  user: admin  password: {password}\n"
        "  It changes at every start; configure CXR_DASHBOARD_USERS to keep one.\n",
        err=True,
    )
    return {"CXR_DASHBOARD_USERS": json.dumps(users)}


@main.command()
@click.pass_context
def serve(ctx: click.Context) -> None:
    """Run listener, worker and dashboard together (single machine, embedded defaults)."""
    from service.core.db import migrate as run_migrate

    settings = _settings(ctx)
    env = _child_env(ctx)
    if not settings.dashboard_users:
        env.update(_one_time_admin(settings))
    run_migrate(settings)
    me = [sys.executable, "-m", "service.cli"]
    commands = {
        "listener": [*me, "listener"],
        "worker": [sys.executable, "-m", "worker"],
        "dashboard": [*me, "dashboard"],
    }
    children = {name: subprocess.Popen(cmd, env=env) for name, cmd in commands.items()}
    log.info(
        "serving: DICOM %s@%d, dashboard http://%s:%d, data %s",
        settings.listener_ae_title,
        settings.listener_port,
        settings.dashboard_host,
        settings.dashboard_port,
        settings.data_dir.resolve(),
    )
    stopping = False

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    exit_code = 0
    while not stopping:
        for name, proc in children.items():
            if proc.poll() is not None:
                log.error("%s exited with %s; stopping the others", name, proc.returncode)
                exit_code = proc.returncode or 1
                stopping = True
        time.sleep(0.5)
    for proc in children.values():
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    # The listener drains open associations and the worker finishes (or hands back) its task first.
    deadline = time.monotonic() + max(settings.listener_drain_seconds, settings.worker_shutdown_seconds) + 15
    for proc in children.values():
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
