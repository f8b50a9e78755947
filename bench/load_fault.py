"""Load and fault harness: many studies, two listeners, four workers, and things breaking on purpose.

Real peers only: a private redis-server with AOF, a fresh PostgreSQL database, a private Orthanc as the
PACS, DCMTK storescu processes as modalities, `cxr-gateway listener`/`worker` processes as deployed.
Faults (each at a fraction of the studies sent): kill -9 two workers (restarted 10 s later, as systemd
would), kill -9 Redis and restart it from its AOF, stop Orthanc for a while, and a rolling restart
(SIGTERM to one listener and one worker, each started again once it has exited, as a deploy does).

Run:  .venv/bin/python bench/load_fault.py --studies 500 [--senders 4] [--workers 4] [--no-faults]
      [--worker-pool threads --worker-concurrency 8]   (the GPU worker's set-up: batching across studies)
Prints: studies complete, SR/SC per study in Orthanc, duplicates, stuck jobs, stage latency percentiles
from the database timestamps, and throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.support.dcmtk import storescu  # noqa: E402
from tests.support.net import free_port, port_open  # noqa: E402
from tests.support.orthanc import OrthancServer  # noqa: E402
from tests.support.site import OUTPUTS_PER_STUDY, make_studies  # noqa: E402

PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/test"


class Proc:
    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name, self.args, self.env, self.log = name, args, env, log_dir / f"{name}.log"
        self.p: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as fh:
            self.p = subprocess.Popen(
                self.args, env=self.env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True
            )

    def kill9(self) -> None:
        if self.p and self.p.poll() is None:
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()

    def stop(self) -> None:
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)  # the main process only: see tests/support/gateway.py
            try:
                self.p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill9()

    def restart_gracefully(self) -> None:
        """SIGTERM to the main process only (as Kubernetes does), start again once it has exited."""
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(timeout=120)
            except subprocess.TimeoutExpired:
                print(f"{self.name} did not stop in 120 s after SIGTERM")
                self.kill9()
        self.start()


def percentiles(values: list[float]) -> str:
    if not values:
        return "n/a"
    q = np.percentile(values, [50, 95, 99])
    return f"p50 {q[0]:7.2f}  p95 {q[1]:7.2f}  p99 {q[2]:7.2f}  (n={len(values)})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=500)
    ap.add_argument("--senders", type=int, default=4)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--side", type=int, default=512)
    ap.add_argument("--no-faults", action="store_true")
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    ap.add_argument("--worker-pool", default="prefork", choices=["prefork", "threads"])
    ap.add_argument("--worker-concurrency", type=int, default=1)
    ap.add_argument("--max-wait-ms", type=float, default=10.0)
    args = ap.parse_args()

    import psycopg
    from psycopg import sql

    work = Path(tempfile.mkdtemp(prefix="cxr-load-"))
    logs = work / "logs"
    logs.mkdir()
    print(f"work dir {work}")
    files = make_studies(args.studies, work / "in", side=args.side, tag="LOAD")

    redis_port = free_port()
    redis_dir = work / "redis"
    redis_dir.mkdir()
    redis_args = [
        "redis-server",
        "--port",
        str(redis_port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(redis_dir),
        "--appendonly",
        "yes",
        "--appendfsync",
        "everysec",
        "--save",
        "",
        "--maxmemory-policy",
        "noeviction",
    ]
    redis = Proc("redis", redis_args, dict(os.environ), logs)
    redis.start()
    while not port_open("127.0.0.1", redis_port):
        time.sleep(0.1)

    dbname = f"cxr_load_{secrets.token_hex(4)}"
    admin = psycopg.connect(PG_ADMIN, autocommit=True)
    admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{dbname}"

    orthanc = OrthancServer(workdir=work / "orthanc").start()
    listener_ports = [free_port(), free_port()]
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CXR_")},
        "CXR_DATA_DIR": str(work / "data"),
        "CXR_DATABASE_URL": db_url,
        "CXR_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
        "CXR_DESTINATIONS": json.dumps(
            [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": orthanc.dicom_port}]
        ),
        "CXR_STUDY_QUIET_SECONDS": "1",
        "CXR_TORCH_THREADS": "1",
        "CXR_DELIVERY_RETRY_BASE_SECONDS": "2",
        "CXR_DELIVERY_MAX_RETRIES": "10",
        "CXR_RECONCILE_INTERVAL_SECONDS": "5",
        "CXR_RECONCILE_QUEUED_AFTER_SECONDS": "240",
        "CXR_RECONCILE_RUNNING_AFTER_SECONDS": "240",
        # A killed worker's running jobs go back once its heartbeat is 15 s old, not at the 240 s deadline.
        "CXR_WORKER_HEARTBEAT_SECONDS": "5",
        "CXR_RECONCILE_WORKER_LOST_AFTER_SECONDS": "15",
        "CXR_SPOOL_MIN_FREE_BYTES": "0",
        "CXR_LOG_LEVEL": "WARNING",
        "CXR_WORKER_POOL": args.worker_pool,
        "CXR_WORKER_CONCURRENCY": str(args.worker_concurrency),
        "CXR_INFERENCE_MAX_WAIT_MS": str(args.max_wait_ms),
        "CXR_WORKER_SHUTDOWN_SECONDS": "30",
        "CXR_LISTENER_DRAIN_SECONDS": "30",
    }
    cli = [sys.executable, "-m", "service.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, capture_output=True)
    listeners = [
        Proc(f"listener-{i}", [*cli, "listener"], {**env, "CXR_LISTENER_PORT": str(p)}, logs)
        for i, p in enumerate(listener_ports)
    ]
    workers = [
        Proc(f"worker-{i}", [sys.executable, "-m", "worker", "--hostname", f"w{i}@%h"], env, logs)
        for i in range(args.workers)
    ]
    for p in [*listeners, *workers]:
        p.start()
    for port in listener_ports:
        while not port_open("127.0.0.1", port):
            time.sleep(0.2)

    sent = Counter[str]()
    chunks = [files[i :: args.senders] for i in range(args.senders)]
    t0 = time.monotonic()
    failures: list[str] = []

    def send(chunk: list[Path], port: int) -> None:
        # One association per batch of 10, like a PACS routing studies as they complete.
        for j in range(0, len(chunk), 10):
            batch = chunk[j : j + 10]
            for attempt in range(20):
                r = storescu("127.0.0.1", port, batch, called_aet="CXR_GATEWAY", timeout=300)
                if r.returncode == 0:
                    break
                time.sleep(2 + attempt)  # a PACS retries later (0xA700 during a fault)
            else:
                failures.append(f"batch {j} to {port}")
            sent["n"] += len(batch)

    threads = [threading.Thread(target=send, args=(c, listener_ports[i % 2])) for i, c in enumerate(chunks)]
    for t in threads:
        t.start()

    def counts() -> dict[str, int]:
        with psycopg.connect(db_url.replace("+psycopg", "")) as c:
            rows = c.execute("select status, count(*) from jobs group by status").fetchall()
            d = {s: n for s, n in rows}
            d["delivered"] = c.execute("select count(*) from deliveries where status='delivered'").fetchone()[
                0
            ]
            d["studies"] = c.execute("select count(*) from studies").fetchone()[0]
            return d

    faults_done: list[str] = []
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        c = counts()
        done_studies = c.get("done", 0)
        progress = done_studies / args.studies
        if not args.no_faults:
            if progress >= 0.15 and "workers" not in faults_done:
                faults_done.append("workers")
                print(f"[{time.monotonic() - t0:6.1f}s] FAULT kill -9 two workers")
                for w in workers[:2]:
                    w.kill9()
                threading.Timer(10, lambda: [w.start() for w in workers[:2]]).start()
            elif progress >= 0.35 and "redis" not in faults_done:
                faults_done.append("redis")
                print(f"[{time.monotonic() - t0:6.1f}s] FAULT kill -9 Redis, restart from AOF in 5 s")
                redis.kill9()
                time.sleep(5)
                redis.start()
            elif progress >= 0.55 and "orthanc" not in faults_done:
                faults_done.append("orthanc")
                print(f"[{time.monotonic() - t0:6.1f}s] FAULT stop Orthanc (destination) for 30 s")
                orthanc.stop()
                threading.Timer(30, lambda: orthanc.start(keep_ports=True)).start()
            elif progress >= 0.75 and "rolling restart" not in faults_done:
                faults_done.append("rolling restart")
                print(f"[{time.monotonic() - t0:6.1f}s] FAULT rolling restart: SIGTERM listener-0, worker-3")
                for proc in (listeners[0], workers[-1]):
                    threading.Thread(target=proc.restart_gracefully).start()
        all_sent = not any(t.is_alive() for t in threads)
        finished = sum(c.get(s, 0) for s in ("done", "failed", "skipped"))
        # Every study's job final and every done job's SR + SC delivered (a failed job ends the run too,
        # and shows in the result, instead of holding it until the timeout).
        studies_in = c.get("studies", 0)
        if all_sent and min(studies_in, finished) >= args.studies and c["delivered"] >= 2 * done_studies:
            break
        time.sleep(2)
    elapsed = time.monotonic() - t0
    time.sleep(3)

    # ---- results -----------------------------------------------------------------------------------
    with psycopg.connect(db_url.replace("+psycopg", "")) as c:
        status = dict(c.execute("select status, count(*) from jobs group by status").fetchall())
        studies = c.execute("select count(*) from studies").fetchone()[0]
        unfinished = c.execute(
            "select count(*) from studies s where not exists "
            "(select 1 from jobs j where j.study_id = s.id and j.status in ('done','skipped'))"
        ).fetchone()[0]
        jobs = c.execute(
            "select received_at, queued_at, started_at, finished_at from jobs where status='done'"
        ).fetchall()
        batches = [
            r[0]
            for r in c.execute(
                "select (result->'inference'->>'batch_images')::int from jobs "
                "where status='done' and result->'inference' is not null"
            ).fetchall()
        ]
        deliveries = dict(c.execute("select status, count(*) from deliveries group by status").fetchall())
        last_delivery = c.execute(
            "select j.received_at, max(d.delivered_at) from jobs j join deliveries d on d.job_id = j.id "
            "where d.status='delivered' group by j.id"
        ).fetchall()
        requeued = dict(
            c.execute(
                "select reason_code, count(*) from job_events "
                "where reason_code in ('requeued_by_reconciler', 'worker_lost') group by reason_code"
            ).fetchall()
        )
    instances = orthanc.rest_get("/instances", expand="true") if orthanc.running else []
    per_study = Counter[str]()
    sop_seen = Counter[str]()
    for inst in instances:
        tags = orthanc.rest_get(f"/instances/{inst['ID']}/simplified-tags")
        per_study[tags["StudyInstanceUID"]] += 1
        sop_seen[tags["SOPInstanceUID"]] += 1
    complete = sum(1 for n in per_study.values() if n == OUTPUTS_PER_STUDY)

    def secs(a: datetime | None, b: datetime | None) -> float | None:
        return (b - a).total_seconds() if a and b else None

    stage = {
        "received→queued (quiet period + enqueue)": [secs(r, q) for r, q, _, _ in jobs],
        "queued→running (queue wait)": [secs(q, s) for _, q, s, _ in jobs],
        "running→done (inference + SR/SC)": [secs(s, f) for _, _, s, f in jobs],
        "received→delivered (end to end)": [secs(r, d) for r, d in last_delivery],
    }
    print("\n=== load-and-fault result ===")
    print(
        f"studies sent {args.studies} from {args.senders} storescu processes to 2 listeners; "
        f"{args.workers} workers; faults: {', '.join(faults_done) or 'none'}"
    )
    print(f"send failures after retries: {len(failures)}")
    print(f"studies in DB {studies}; jobs by status {status}; studies without a finished job: {unfinished}")
    print(f"deliveries by status {deliveries}; jobs re-enqueued by the reconciler, by reason: {requeued}")
    print(
        f"Orthanc: {len(instances)} instances; studies with exactly SR+SC: {complete}/{args.studies}; "
        f"duplicate SOP instances: {sum(n - 1 for n in sop_seen.values() if n > 1)}"
    )
    for name, values in stage.items():
        print(f"{name:45s} {percentiles([v for v in values if v is not None])}")
    if batches:
        print(
            f"workers: pool {args.worker_pool} x{args.worker_concurrency}; images per forward pass: "
            f"mean {np.mean(batches):.2f}, max {max(batches)}"
        )
    print(
        f"wall time {elapsed:.1f} s → {args.studies / elapsed * 60:.1f} studies/min on {os.cpu_count()} cores"
    )

    for p in [*workers, *listeners]:
        p.stop()
    orthanc.stop()
    redis.stop()
    admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname)))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
