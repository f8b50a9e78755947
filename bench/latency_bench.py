"""Latency benchmark: one-image chest CR studies through ``cxr-gateway serve`` into a real Orthanc.

    .venv/bin/python bench/latency_bench.py [--studies 20] [--setup embedded|redis-pg|both]
        [--code DIR] [--env KEY=VALUE ...] [--json OUT]

As a new user measures it: Orthanc as the PACS (the gateway's one destination), ``cxr-gateway serve`` on
its defaults in a temp data dir, DCMTK's ``storescu`` sending each study on its own association, one
after another (the next once the previous one's results are in the PACS). Each study is the real CR film
in ../shared with fresh Study/Series/SOP Instance UIDs.

End to end: from the association's release (storescu exited) to the SR and the SC both listed by Orthanc
(polled every 20 ms). Stages from the gateway's own rows (service.admin.latency, what the dashboard
shows): quiet (released -> queued), broker (queued -> running), analysis (running -> done), delivery
(done -> last output delivered). p50/p95/p99 with linear interpolation between ranks.

``--setup redis-pg``: the broker on the Redis at 127.0.0.1:6379 (a free logical DB, claimed as the test
suite claims them) and the database a fresh one on the PostgreSQL at 127.0.0.1:5432, dropped afterwards.
``--idle-cpu``: instead, the CPU the idle ``serve`` process tree spends (e.g. with
``--env CXR_BROKER_POLL_SECONDS=1`` against the default 0.05).
``--code DIR``: run the gateway from another checkout (e.g. a ``git worktree`` of the previous commit).
Lives outside ``tests/`` so pytest never collects it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import httpx
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import create_engine, select
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parents[1]
if __name__ == "__main__":  # run as a script; imported (throughput_bench), the caller's path stands
    sys.path.insert(0, str(REPO))

from service.core.models import Job, Study  # noqa: E402
from tests.support.dcmtk import storescu  # noqa: E402
from tests.support.gateway import GatewayProcesses  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402

SOURCE = REPO.parent / "shared" / "dicom" / "chest" / "cr-pa-mono1-explicit-le.dcm"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/test"
POLL_SECONDS = 0.02
# The default outputs of a one-image study: measurement SR, results report SR, heatmap SC.
OUTPUTS = 3
# The harness's own shortcuts (tests/support/gateway.py) that are not the defaults a user runs.
HARNESS_OVERRIDES = ("CXR_STUDY_QUIET_SECONDS", "CXR_DELIVERY_RETRY_BASE_SECONDS", "CXR_TORCH_THREADS")


def make_studies(n: int, out: Path, source: Path = SOURCE) -> list[Path]:
    """``n`` copies of the source film, each its own study (fresh UIDs, distinct patient)."""
    out.mkdir(parents=True, exist_ok=True)
    template = dcmread(source)
    files = []
    for i in range(n):
        ds = template.copy()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PatientID, ds.PatientName, ds.AccessionNumber = f"LAT{i:05d}", f"LATENCY^{i:03d}", f"LAT{i:05d}"
        path = out / f"study-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


@contextlib.contextmanager
def private_postgres() -> Iterator[str]:
    import psycopg
    from psycopg import sql

    name = f"cxr_latency_{secrets.token_hex(4)}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5) as admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        finally:
            admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def private_redis() -> Iterator[str]:
    """A Redis DB of our own under the test suite's claim protocol (tests/support/redis_db)."""
    # Imported here: throughput_bench imports this module on older checkouts that lack it.
    from tests.support.redis_db import claimed_db, lock_client

    def busy(message: str) -> NoReturn:
        raise SystemExit(message)

    lock = lock_client()
    try:
        with claimed_db(lock, busy, token_prefix="bench-") as url:
            yield url
    finally:
        lock.close()


def results_in_pacs(client: httpx.Client, study_uid: str) -> dict[str, int]:
    """Instances per modality that Orthanc holds for the study (the SC heatmap is modality OT)."""
    response = client.post(
        "/tools/find", json={"Level": "Series", "Query": {"StudyInstanceUID": study_uid}, "Expand": True}
    )
    response.raise_for_status()
    counts: dict[str, int] = {}
    for series in response.json():
        modality = series["MainDicomTags"].get("Modality", "")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


def send_and_wait(
    gw: GatewayProcesses, pacs: OrthancServer, path: Path, timeout: float
) -> tuple[datetime, float, float]:
    """Send one study; returns its release time (wall clock), the seconds until an SR and the SC are in
    the PACS, and until every output (``OUTPUTS``) is."""
    uid = str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)
    done = storescu("127.0.0.1", gw.listener_port, [path], called_aet=gw.ae_title, verbose=False)
    released, t0 = datetime.now(UTC), time.monotonic()
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-2000:]}")
    sr_sc: float | None = None
    with httpx.Client(base_url=pacs.url, timeout=5) as client:
        while True:
            counts = results_in_pacs(client, uid)
            elapsed = time.monotonic() - t0
            if sr_sc is None and counts.get("SR") and counts.get("OT"):
                sr_sc = elapsed
            if sr_sc is not None and sum(counts.values()) >= OUTPUTS:
                return released, sr_sc, elapsed
            if elapsed > timeout:
                raise TimeoutError(f"outputs in the PACS after {timeout} s: {counts}\n{gw.log_tail()}")
            time.sleep(POLL_SECONDS)


def db_url(gw: GatewayProcesses) -> str:
    return gw.env.get("CXR_DATABASE_URL") or f"sqlite:///{gw.data_dir / 'cxr.sqlite'}"


def wait_for_worker(gw: GatewayProcesses, timeout: float = 120) -> None:
    """``serve`` is up once its worker has registered (the listener port opens sooner)."""
    from service.core.models import Worker

    engine = create_engine(db_url(gw))
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception), Session(engine) as session:
                if session.scalar(select(Worker.name).where(Worker.stopped_at.is_(None))) is not None:
                    return
            time.sleep(0.2)
    finally:
        engine.dispose()
    raise TimeoutError(f"no worker registered\n{gw.log_tail()}")


def run_setup(
    name: str, files: list[Path], env: dict[str, str], workdir: Path, code: Path | None
) -> dict[str, Any]:
    extra = dict(env)
    if code is not None:
        extra["PYTHONPATH"] = str(code)
    with OrthancServer(workdir=workdir / "orthanc") as pacs:
        destinations = [{"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}]
        gw = GatewayProcesses(workdir / "gateway", destinations=destinations, env=extra)
        for key in HARNESS_OVERRIDES:
            if key not in env:
                gw.env.pop(key, None)  # the product's defaults, not the test harness's
        with gw:
            wait_for_worker(gw)
            e2e: list[float] = []
            e2e_all: list[float] = []
            released: dict[str, datetime] = {}
            for path in files:
                at, sr_sc, every = send_and_wait(gw, pacs, path, timeout=120)
                released[str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)] = at
                e2e.append(sr_sc)
                e2e_all.append(every)
            time.sleep(0.5)  # the last delivery rows' outcome written after Orthanc answered
            stages = gateway_stages(db_url(gw), released)
    stages["pacs_sr_sc"] = e2e
    stages["pacs_all_outputs"] = e2e_all
    return {"setup": name, "studies": len(files), "seconds": stages}


def gateway_stages(url: str, released: dict[str, datetime]) -> dict[str, list[float]]:
    from service.admin.latency import job_times, stage_seconds

    engine = create_engine(url)
    try:
        with Session(engine) as session:
            times = job_times(session, datetime.now(UTC) - timedelta(days=1))
            by_job = dict(session.execute(select(Job.id, Study.study_instance_uid).join(Study)).all())
    finally:
        engine.dispose()
    stages = stage_seconds(times)
    # The release as storescu saw it, against the gateway's own idea of it (the study's last receipt).
    stages["release_to_queued_by_client"] = [
        (t.queued_at - released[by_job[t.job_id]]).total_seconds()
        for t in times
        if by_job[t.job_id] in released
    ]
    return stages


def idle_cpu(env: dict[str, str], workdir: Path, code: Path | None, seconds: float = 60) -> str:
    """CPU the whole ``serve`` process tree spends idle (no studies), as a share of one core."""
    extra = {**env, **({"PYTHONPATH": str(code)} if code is not None else {})}
    gw = GatewayProcesses(workdir / "idle", env=extra)
    for key in HARNESS_OVERRIDES:
        if key not in env:
            gw.env.pop(key, None)
    with gw:
        wait_for_worker(gw)
        time.sleep(15)  # start-up (warm-up, migrations) over
        root = gw.procs["serve"].pid
        before, started = _tree_cpu(root), time.monotonic()
        time.sleep(seconds)
        share = (_tree_cpu(root) - before) / (time.monotonic() - started)
    return f"idle serve tree, env={env}: {100 * share:.1f} % of one core over {seconds:.0f} s"


def _tree_cpu(root: int) -> float:
    """User + system CPU seconds of ``root`` and its descendants, from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
    tree, grew = {root}, True
    while grew:
        found = {pid for pid, parent in parents.items() if parent in tree} - tree
        tree |= found
        grew = bool(found)
    total = 0
    for pid in tree:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def report(result: dict[str, Any]) -> str:
    from service.admin.latency import STAGES, percentile

    lines = [f"setup={result['setup']} studies={result['studies']} load={os.getloadavg()}"]
    lines.append(f"  {'stage':<30}{'n':>4}{'p50':>9}{'p95':>9}{'p99':>9}   span")
    described = {
        **STAGES,
        "pacs_sr_sc": "storescu exit -> an SR and the SC listed by Orthanc",
        "pacs_all_outputs": "storescu exit -> all outputs listed by Orthanc",
    }
    described["release_to_queued_by_client"] = "storescu exit -> queued"
    for stage, values in result["seconds"].items():
        cells = "".join(f"{percentile(values, q) or float('nan'):9.3f}" for q in (50, 95, 99))
        lines.append(f"  {stage:<30}{len(values):>4}{cells}   {described.get(stage, '')}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--setup", choices=["embedded", "redis-pg", "both"], default="both")
    parser.add_argument("--code", type=Path, help="run the gateway from this checkout (PYTHONPATH)")
    parser.add_argument("--env", action="append", default=[], help="KEY=VALUE for the gateway")
    parser.add_argument("--json", type=Path, help="write the raw seconds here")
    parser.add_argument("--keep", type=Path, help="work dir to keep (logs, Orthanc, data)")
    parser.add_argument("--idle-cpu", action="store_true", help="measure serve's idle CPU instead")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    workdir = args.keep or Path(tempfile.mkdtemp(prefix="cxr-latency-"))
    if args.idle_cpu:
        print(idle_cpu(env, workdir, args.code), flush=True)
        return
    files = make_studies(args.studies, workdir / "studies")
    setups = ["embedded", "redis-pg"] if args.setup == "both" else [args.setup]
    results = []
    print(f"load before: {os.getloadavg()} code={args.code or REPO} env={env}", flush=True)
    for setup in setups:
        with contextlib.ExitStack() as stack:
            setup_env = dict(env)
            if setup == "redis-pg":
                setup_env["CXR_DATABASE_URL"] = stack.enter_context(private_postgres())
                setup_env["CXR_BROKER_URL"] = stack.enter_context(private_redis())
            result = run_setup(setup, files, setup_env, workdir / setup, args.code)
        results.append(result)
        print(report(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"env": env, "code": str(args.code or REPO), "results": results}))


if __name__ == "__main__":
    main()
