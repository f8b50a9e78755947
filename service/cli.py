"""``cxr-gateway``: one command for every part. ``serve`` runs them all on one machine."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

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
    from service.listener_main import run_listener

    run_listener(_settings(ctx))


_VERBOSE = click.option(
    "--verbose",
    is_flag=True,
    help="Also print the libraries' own start-up and shutdown lines (Celery's banner, uvicorn's INFO lines).",
)


@main.command()
@_VERBOSE
@click.pass_context
def dashboard(ctx: click.Context, verbose: bool) -> None:
    """Run the admin dashboard (HTTP)."""
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
    if verbose:
        setup_logging(settings.log_level, verbose=True)
    _run_dashboard(create_app(settings, make_session_factory(settings)), settings)


def _run_dashboard(app: Any, settings: Settings) -> None:
    """``uvicorn.run`` with the gateway's own "dashboard up" line once the port is bound (uvicorn's own
    INFO lines are kept out of the log, see ``setup_logging``)."""
    import uvicorn
    from uvicorn.config import STARTUP_FAILURE

    admin_log = logging.getLogger("cxr_gateway.admin")
    url = f"http://{settings.dashboard_host}:{settings.dashboard_port}"

    class Server(uvicorn.Server):
        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                admin_log.info("dashboard up url=%s", url)

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            admin_log.info("dashboard stopping")
            await super().shutdown(sockets)

    server = Server(
        uvicorn.Config(app, host=settings.dashboard_host, port=settings.dashboard_port, log_config=None)
    )
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # uvicorn logged why (e.g. the port is taken)


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@_VERBOSE
@click.pass_context
def worker(ctx: click.Context, verbose: bool) -> None:
    """Run a Celery worker (inference and delivery queues); extra arguments go to Celery."""
    # The service package never imports the worker: start it as its own program.
    os.execv(sys.executable, [sys.executable, "-m", "worker", *(["--verbose"] if verbose else []), *ctx.args])


@main.command(context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
@click.pass_context
def train(ctx: click.Context) -> None:
    """Model tooling (``python -m monai_train``): arguments are passed through."""
    os.execv(sys.executable, [sys.executable, "-m", "monai_train", *ctx.args])


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True}, add_help_option=False
)
@click.pass_context
def evaluate(ctx: click.Context) -> None:
    """Measure a bundle on labelled images as the worker runs it (--help: its options)."""
    # The service package never imports torch, monai or monai_train: the evaluation is its own program.
    os.execv(sys.executable, [sys.executable, "-m", "monai_train", "evaluate", *ctx.args])


@main.command()
@click.option("--dry-run", is_flag=True, help="List what is due without deleting anything.")
@click.pass_context
def purge(ctx: click.Context, dry_run: bool) -> None:
    """Delete the spooled images and outputs of studies past CXR_RETENTION_DAYS (settled ones only)."""
    from service.core.db import database_now, make_session_factory
    from service.core.retention import purge as run_purge

    sessions = make_session_factory(_settings(ctx))
    report = run_purge(sessions, _settings(ctx), database_now(sessions), dry_run=dry_run)
    verb = "would purge" if dry_run else "purged"
    click.echo(
        f"{verb} {len(report.purged)} studies: {report.files} files, {report.bytes} bytes; kept "
        f"{report.kept_unsettled} not settled (unfinished or undelivered), {report.kept_labelled} labelled "
        "and not exported"
    )


@main.command()
@click.option("--since", type=click.DateTime(["%Y-%m-%d"]), help="Jobs received from this day (UTC).")
@click.option("--until", type=click.DateTime(["%Y-%m-%d"]), help="Jobs received before this day (UTC).")
@click.option("--bundle-version", help="Only this bundle version's jobs (default: all).")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), help="Write the HTML report here.")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON.")
@click.pass_context
def validate(
    ctx: click.Context,
    since: datetime | None,
    until: datetime | None,
    bundle_version: str | None,
    out: Path | None,
    as_json: bool,
) -> None:
    """Per-finding figures of the model on the site's labelled studies (reference labels, reader feedback)."""
    from service.core.db import make_session_factory
    from service.site.operating_points import site_findings
    from service.site.report import fmt, fmt_auroc, render_html
    from service.site.validation import validate as run_validate

    settings = _settings(ctx)
    with make_session_factory(settings)() as session:
        model = site_findings(session, settings.model_bundle)  # the live bundle at the site's thresholds
        report = run_validate(
            session,
            model.labels,
            model.operating_points,
            since=since.replace(tzinfo=UTC) if since else None,
            until=until.replace(tzinfo=UTC) if until else None,
            bundle_version=bundle_version,
        )
    if out is not None:
        out.write_text(
            render_html(report, model=" ".join(filter(None, [settings.model_bundle.name, model.version])))
        )
    if as_json:
        click.echo(json.dumps(report.as_json(), indent=2))
        return
    click.echo(
        f"{report.studies} labelled studies, {report.patients} patients"
        " (AI-generated, not for diagnostic use)"
    )
    click.echo(
        f"{'finding':<20} {'n':>5} {'pos':>5}  {'AUROC (95% CI)':<22} {'sensitivity':<18} {'specificity':<18}"
    )
    for f in report.findings:
        click.echo(
            f"{f.finding:<20} {f.studies:>5} {f.positives:>5}  {fmt_auroc(f):<22} "
            f"{fmt(f.sensitivity):<18} {fmt(f.specificity):<18}"
        )
    if out is not None:
        click.echo(f"report written to {out}")


@main.command("export-training")
@click.option(
    "--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder to write."
)
@click.option(
    "--keep-identifiers",
    is_flag=True,
    help="Write the studies as received (no pseudonyms, nothing removed): only inside the hospital.",
)
@click.pass_context
def export_training(ctx: click.Context, out: Path, keep_identifiers: bool) -> None:
    """Write the labelled studies (de-identified) and a labels CSV for `python -m monai_train finetune`."""
    from service.core.db import make_session_factory
    from service.site.export import export_training as run_export

    settings = _settings(ctx)
    with make_session_factory(settings).begin() as session:
        report = run_export(session, settings, out, identified=keep_identifiers)
    click.echo(
        f"exported {report.studies} labelled studies of {len(report.patients)} patients: {report.files} "
        f"files ({report.missing_files} purged or missing) and labels.csv in {out}"
    )
    click.echo(
        f"fine-tune: python -m monai_train finetune --from BUNDLE --images {out / 'images'} "
        f"--labels {out / 'labels.csv'} --out NEW_BUNDLE --version NEW_VERSION"
    )


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


def _die_with_serve() -> Callable[[], None] | None:
    """For ``Popen(preexec_fn=...)`` on Linux: the child gets SIGKILL if ``serve`` dies without stopping it
    (``kill -9``), as it did while it shared serve's process group."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL(None, use_errno=True).prctl
    serve_pid = os.getpid()

    def _in_child() -> None:
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != serve_pid:  # serve died before the line above
            os._exit(1)

    return _in_child


@main.command()
@_VERBOSE
@click.pass_context
def serve(ctx: click.Context, verbose: bool) -> None:
    """Run listener, worker and dashboard together (single machine, embedded defaults)."""
    from service.core.db import migrate as run_migrate

    settings = _settings(ctx)
    if verbose:
        setup_logging(settings.log_level, verbose=True)
    env = _child_env(ctx)
    if not settings.dashboard_users:
        env.update(_one_time_admin(settings))
    run_migrate(settings, verbose=verbose)
    me = [sys.executable, "-m", "service.cli"]
    more = ["--verbose"] if verbose else []
    commands = {
        "listener": [*me, "listener"],
        "worker": [sys.executable, "-m", "worker", *more],
        "dashboard": [*me, "dashboard", *more],
    }
    # Each child in a session of its own: a Ctrl-C at the terminal, or a signal to serve's process group
    # (`timeout`, a supervisor), reaches serve alone, which stops each child once through its main process.
    # A signal to the worker's group would also hit Celery's pool children (deploy/README.md, "Graceful
    # shutdown"), and a second one would turn uvicorn's graceful stop into a forced one.
    stopping = False

    def _stop(signum: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):  # SIGHUP: the terminal closed
        signal.signal(signum, _stop)
    die_with_serve = _die_with_serve()
    children = {
        name: subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_serve)
        for name, cmd in commands.items()
    }
    log.info(
        "serving: DICOM %s@%d, dashboard http://%s:%d, data %s",
        settings.listener_ae_title,
        settings.listener_port,
        settings.dashboard_host,
        settings.dashboard_port,
        settings.data_dir.resolve(),
    )
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
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # its own group: the worker's pool children too
            proc.wait()
    sys.exit(exit_code)


if __name__ == "__main__":
    main()
