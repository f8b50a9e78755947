"""The deployed set-up, as a fault test drives it: one listener, two workers, Redis with its AOF, PostgreSQL,
Orthanc as the PACS, and a supervisor that starts a process again 5 s after it ended (systemd's
``Restart=always`` / ``RestartSec=5`` in deploy/systemd). Every process is real; faults are real signals.

Measures what the fault suite reports for each combination: studies complete in the PACS, duplicates,
stuck deliveries, and the recovery time (from the last fault's end to the last result in the PACS).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from PIL import Image
from pydicom import Dataset
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

from tests.support.dcmtk import storescu
from tests.support.net import port_open
from tests.support.orthanc import OrthancServer
from tests.support.postgres_server import PostgresServer
from tests.support.redis_server import RedisServer

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
# One-image studies with the default outputs: measurement SR, results SR and heatmap SC.
OUTPUTS_PER_STUDY = 3
RESTART_SECONDS = 5.0  # deploy/systemd: RestartSec=5


def chest_dataset(
    pixels: np.ndarray, *, sop_class: str, modality: str, bits_stored: int, **attributes: Any
) -> Dataset:
    """One single-frame MONOCHROME2 PA chest image with fresh UIDs (Explicit VR LE), plus ``attributes``
    by keyword: the one synthetic-image writer of the suite and the benches."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = modality, "CHEST", "PA"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        bits,
        bits_stored,
        bits_stored - 1,
        0,
    )
    ds.PixelData = pixels.tobytes()
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def make_studies(
    n: int,
    out: Path,
    side: int = 512,
    tag: str = "F",
    *,
    rows: int | None = None,
    source: str = "nih-cxr14-64px",
) -> list[Path]:
    """``n`` single-image CR chest studies (12-bit pixels from the NIH images in ``source``, upscaled to
    ``side`` columns and ``rows`` rows, square unless given)."""
    pngs = sorted((SHARED / "data" / source / "images").glob("*.png"))
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(n):
        size = (side, rows or side)
        img = Image.open(pngs[i % len(pngs)]).convert("L").resize(size, Image.Resampling.BILINEAR)
        pixels = (np.asarray(img, dtype=np.uint16) * 16).astype(np.uint16)
        ds = chest_dataset(
            pixels,
            sop_class=ComputedRadiographyImageStorage,
            modality="CR",
            bits_stored=12,
            PatientName=f"FAULT^{tag}{i:03d}",
            PatientID=f"{tag}{i:05d}",
            StudyDate="20260101",
            StudyTime="120000",
            AccessionNumber=f"{tag}{i:05d}",
            SeriesNumber=1,
            InstanceNumber=1,
        )
        path = out / f"{tag}-{i:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return files


def study_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).StudyInstanceUID)


class Proc:
    """One gateway process under the supervisor: started again RESTART_SECONDS after it ends, unless it
    was stopped on purpose."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logs: Path) -> None:
        self.name, self.args, self.env, self.log = name, args, env, logs / f"{name}.log"
        self.p: subprocess.Popen[bytes] | None = None
        self.wanted = False
        self.exits: list[int] = []
        self.died_at: float | None = None
        self.started_at = 0.0

    @property
    def alive(self) -> bool:
        return self.p is not None and self.p.poll() is None

    def start(self) -> None:
        with self.log.open("ab") as fh:
            self.p = subprocess.Popen(
                self.args,
                env=self.env,
                cwd=REPO_ROOT,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.wanted, self.died_at, self.started_at = True, None, time.monotonic()

    def kill9(self) -> None:
        if self.alive:
            assert self.p is not None
            os.killpg(self.p.pid, signal.SIGKILL)
            self.p.wait()

    def stop(self) -> None:
        self.wanted = False
        if self.alive:
            assert self.p is not None
            self.p.send_signal(signal.SIGTERM)  # the main process only, as systemd's KillMode=mixed
            try:
                self.p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill9()
        if self.p is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)

    def supervise(self) -> str | None:
        """Called every half second: notes an exit, restarts RESTART_SECONDS later; returns an event."""
        if not self.wanted or self.p is None:
            return None
        code = self.p.poll()
        if code is None:
            return None
        now = time.monotonic()
        if self.died_at is None:
            self.died_at = now
            self.exits.append(code)
            # The pool children of a killed main process: what systemd's cgroup clean-up does.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.p.pid, signal.SIGKILL)
            return f"{self.name} exited {code}"
        if now - self.died_at >= RESTART_SECONDS:
            self.start()
            return f"{self.name} restarted"
        return None


@dataclass
class Sender:
    """A PACS sending batches of studies, one association per batch, resending a batch that failed."""

    done: threading.Event = field(default_factory=threading.Event)
    attempts: int = 0
    failed_batches: int = 0
    refused: list[int] = field(default_factory=list)  # storescu exit codes of failed associations


@dataclass
class Outcome:
    name: str
    studies: int
    complete: int
    duplicates: int
    stuck: int
    recovery_s: float | None
    notes: str = ""

    def line(self) -> str:
        rec = "n/a" if self.recovery_s is None else f"{self.recovery_s:.1f}"
        return (
            f"FAULTS {self.name}: studies complete {self.complete}/{self.studies}, "
            f"duplicates {self.duplicates}, stuck deliveries {self.stuck}, recovery {rec} s"
            f"{'; ' + self.notes if self.notes else ''}"
        )


class Site:
    def __init__(
        self, workdir: Path, *, env: dict[str, str] | None = None, listener_clock: Path | None = None
    ):
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.redis = RedisServer(workdir / "redis")  # appendfsync everysec, as deploy/compose.yml
        self.pg = PostgresServer()
        self.orthanc = OrthancServer(workdir=workdir / "orthanc")
        self.extra_env = env or {}
        self.listener_clock = listener_clock
        self.events: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self.procs: list[Proc] = []
        self.t0 = time.monotonic()

    # ---- set-up -------------------------------------------------------------------------------------
    def start(self) -> Site:
        self.redis.start()
        self.pg.start()
        self.orthanc.start()
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("CXR_")},
            "CXR_DATA_DIR": str(self.workdir / "data"),
            "CXR_DATABASE_URL": self.pg.url(),
            "CXR_BROKER_URL": self.redis.url(),
            "CXR_DESTINATIONS": json.dumps(
                [{"ae_title": "ORTHANC", "host": "127.0.0.1", "port": self.orthanc.dicom_port}]
            ),
            "CXR_LISTENER_HOST": "127.0.0.1",
            "CXR_LISTENER_PORT": str(_free_port()),
            "CXR_TORCH_THREADS": "1",  # two workers on two cores
            "CXR_LOG_LEVEL": "INFO",
            **self.extra_env,
        }
        self.listener_port = int(self.env["CXR_LISTENER_PORT"])
        subprocess.run(
            [sys.executable, "-m", "service.cli", "migrate"],
            env=self.env,
            cwd=REPO_ROOT,
            check=True,
            capture_output=True,
        )
        listener_cmd = [sys.executable, "-m", "service.cli", "listener"]
        if self.listener_clock is not None:
            # The reconciler's host gets a wall clock of its own, stepped by writing this file.
            self.listener_clock.write_text("0\n")
            listener_cmd[1:1] = ["-m", "tests.support.skewed_clock", str(self.listener_clock)]
        self.listener = Proc("listener", listener_cmd, self.env, self.logs)
        self.workers = [
            Proc(f"worker-{i}", [sys.executable, "-m", "worker"], self.env, self.logs) for i in range(2)
        ]
        self.procs = [self.listener, *self.workers]
        for p in self.procs:
            p.start()
        threading.Thread(target=self._supervise, name="supervisor", daemon=True).start()
        self.wait(lambda: port_open("127.0.0.1", self.listener_port), 120, "listener port")
        self.wait(
            lambda: self.scalar("select count(*) from workers where stopped_at is null") >= 2, 180, "workers"
        )
        return self

    def _supervise(self) -> None:
        while not self._stop.wait(0.5):
            for p in self.procs:
                event = p.supervise()
                if event:
                    self.note(event)

    def stop(self) -> None:
        self._stop.set()
        for p in self.procs:
            with contextlib.suppress(Exception):
                p.stop()
        # The processes' logs outlive pytest's temp dirs (which other runs rotate away).
        test = os.environ.get("PYTEST_CURRENT_TEST", "site").split("::")[-1].split(" ")[0]
        with contextlib.suppress(OSError):
            shutil.copytree(self.logs, REPO_ROOT / "build" / "faults-logs" / test, dirs_exist_ok=True)
        with contextlib.suppress(Exception):
            self.orthanc.stop()
        self.redis.kill9()
        self.pg.destroy()

    def __enter__(self) -> Site:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- observing ----------------------------------------------------------------------------------
    def note(self, what: str) -> float:
        now = time.monotonic()
        self.events.append((now - self.t0, what))
        print(f"[{now - self.t0:7.1f}s] {what}", flush=True)
        return now

    def rows(self, query: str, *args: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.pg.url().replace("+psycopg", ""), connect_timeout=5) as conn:
            return list(conn.execute(query, args).fetchall())

    def scalar(self, query: str, *args: Any) -> Any:
        try:
            return self.rows(query, *args)[0][0]
        except psycopg.OperationalError:
            return None

    def wait(self, predicate: Callable[[], bool], timeout: float, what: str) -> float:
        deadline = time.monotonic() + timeout
        while True:
            with contextlib.suppress(psycopg.OperationalError):
                if predicate():
                    return time.monotonic()
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{what} not reached in {timeout:.0f} s\n{self.status()}\n{self.log_tail()}"
                )
            time.sleep(0.5)

    def status(self) -> str:
        try:
            jobs = dict(self.rows("select status, count(*) from jobs group by status"))
            deliveries = dict(self.rows("select status, count(*) from deliveries group by status"))
        except psycopg.OperationalError as exc:
            return f"database away: {exc}"
        return f"jobs {jobs}; deliveries {deliveries}; PACS instances {self.pacs_instances()}"

    def log_tail(self, lines: int = 40) -> str:
        out = []
        for p in self.procs:
            if p.log.exists():
                tail = p.log.read_text(errors="replace").splitlines()[-lines:]
                out.append(f"--- {p.name} ---\n" + "\n".join(tail))
        return "\n".join(out)

    def pacs_instances(self) -> int | None:
        if not self.orthanc.running:
            return None
        try:
            return int(self.orthanc.rest_get("/statistics")["CountInstances"])
        except Exception:
            return None

    def watch_pacs(self, expected: int) -> Callable[[], float | None]:
        """Polls the PACS; returns a function giving the moment its instance count reached ``expected``."""
        reached: list[float] = []

        def poll() -> None:
            while not self._stop.is_set() and not reached:
                n = self.pacs_instances()
                if n is not None and n >= expected:
                    reached.append(time.monotonic())
                    self.note(f"last result in the PACS ({n} instances)")
                    return
                time.sleep(0.25)

        threading.Thread(target=poll, daemon=True).start()
        return lambda: reached[0] if reached else None

    # ---- the PACS sending ---------------------------------------------------------------------------
    def send(
        self,
        files: Sequence[Path],
        *,
        batch: int = 10,
        pace: float = 0.0,
        retry_after: float = 3.0,
        deadline: float = 600,
    ) -> Sender:
        """In the background, as a PACS routes finished studies: one association per batch, ``pace`` s
        apart; a batch that failed (0xA700, aborted, refused) is sent again after ``retry_after`` s, until
        ``deadline``."""
        sender = Sender()

        def run() -> None:
            end = time.monotonic() + deadline
            for j in range(0, len(files), batch):
                chunk = list(files[j : j + batch])
                while time.monotonic() < end:
                    sender.attempts += 1
                    r = storescu(
                        "127.0.0.1", self.listener_port, chunk, called_aet="CXR_GATEWAY", timeout=120
                    )
                    if r.returncode == 0:
                        break
                    sender.refused.append(r.returncode)
                    time.sleep(retry_after)
                else:
                    sender.failed_batches += 1
                time.sleep(pace)
            sender.done.set()

        threading.Thread(target=run, name="pacs-sender", daemon=True).start()
        return sender

    # ---- the verdict --------------------------------------------------------------------------------
    def outcome(
        self, name: str, files: Sequence[Path], fault_end: float, last_result: float | None, notes: str = ""
    ) -> Outcome:
        uids = [study_uid(f) for f in files]
        complete = surplus = 0
        for uid in uids:
            found = self.orthanc.rest_post(
                "/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": uid}}
            )
            complete += len(found) == OUTPUTS_PER_STUDY
            surplus += max(0, len(found) - OUTPUTS_PER_STUDY)
        sent_twice = self.scalar(
            "select count(*) from (select delivery_id from delivery_attempts where outcome = 'delivered' "
            "group by delivery_id having count(*) > 1) t"
        )
        stuck = self.scalar("select count(*) from deliveries where status <> 'delivered'") + self.scalar(
            "select count(*) from jobs where status not in ('done', 'failed', 'skipped')"
        )
        recovery = None if last_result is None else max(0.0, last_result - fault_end)
        result = Outcome(name, len(uids), complete, surplus + sent_twice, stuck, recovery, notes)
        print(result.line(), flush=True)
        with (REPO_ROOT / "build" / "faults.jsonl").open("a") as fh:
            fh.write(json.dumps({**result.__dict__, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
        return result


def _free_port() -> int:
    from tests.support.net import free_port

    return free_port()


def filler(path: Path, size: int) -> None:
    """Take ``size`` bytes of the file system at once (fallocate), as another program filling the disk."""
    with path.open("wb") as fh:
        os.posix_fallocate(fh.fileno(), 0, size)


def free_bytes(path: Path) -> int:
    return shutil.disk_usage(path).free
