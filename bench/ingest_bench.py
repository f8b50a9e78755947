"""Ingest benchmark: one storescu association carrying N real-size CR images, to our listener and to DCMTK.

    .venv/bin/python bench/ingest_bench.py [--count 100] [--side 2048] [--runs 1] [--keep DIR]

Both receivers get the same files over one association each, in the same run, from the same storescu:

* (a) ``cxr-gateway listener`` as a child process on SQLite in a temp dir, quiet period one hour so no job is
  queued while it runs (the worker is not involved): every instance is fsynced and its row committed before
  the 0x0000 goes back;
* (b) DCMTK ``storescp`` writing each instance to a temp dir (no fsync: DCMTK does not promise durability).

DCMTK runs twice: with its defaults, and tuned (``+B`` bit-preserving writes, 128 KiB PDUs), the fastest it
goes. Prints the wall times (medians over ``--runs``) and the ratios. Lives outside ``tests/`` so pytest
never collects it.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ComputedRadiographyImageStorage, ExplicitVRLittleEndian, generate_uid

REPO = Path(__file__).resolve().parents[1]
NIH_IMAGES = REPO.parent / "shared" / "data" / "nih-cxr14-dev" / "images"
AE_TITLE = "CXR_GATEWAY"
DCMTK_CONFIGS = {"storescp": [], "storescp +B -pdu 131072": ["+B", "-pdu", "131072"]}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port}")


def make_images(out: Path, count: int, side: int) -> list[Path]:
    """``count`` CR datasets of side×side 16-bit pixels from NIH PNGs, each with its own study."""
    pngs = sorted(NIH_IMAGES.glob("*.png"))
    if not pngs:
        raise SystemExit(f"no NIH images under {NIH_IMAGES}")
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        with Image.open(pngs[i % len(pngs)]) as im:
            grey = im.convert("L").resize((side, side), Image.Resampling.BILINEAR)
        # 8-bit PNG → 12 bits stored in 16 allocated, like a CR plate reader.
        pixels = (np.asarray(grey, dtype=np.uint16) << 4) | (i & 0xF)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ComputedRadiographyImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID = generate_uid()
        ds.SeriesInstanceUID = generate_uid()
        ds.PatientName = f"BENCH^{i:04d}"
        ds.PatientID = f"BENCH{i:04d}"
        ds.AccessionNumber = f"B{i:06d}"
        ds.StudyDate = "20250101"
        ds.Modality = "CR"
        ds.BodyPartExamined = "CHEST"
        ds.ViewPosition = "PA"
        ds.SeriesNumber = 1
        ds.InstanceNumber = 1
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = side
        ds.Columns = side
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.PixelData = pixels.tobytes()
        path = out / f"cr-{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def storescu(port: int, called: str, files: list[Path], extra: list[str]) -> float:
    """Send all files over one association; returns the wall time of the storescu process."""
    args = ["storescu", "-aet", "BENCH", "-aec", called, "-to", "120", "-ta", "120", "-td", "120", *extra]
    args += ["127.0.0.1", str(port), *map(str, files)]
    start = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.perf_counter() - start
    if done.returncode != 0 or "Failed" in done.stderr:
        raise SystemExit(f"storescu to {called} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return elapsed


@contextmanager
def _server(args: list[str], port: int, log_path: Path, **popen: Any) -> Iterator[int]:
    """Run a DICOM server process until the block ends; yields its port once it listens."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=log, **popen)
        try:
            wait_for_port(port)
            yield port
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@contextmanager
def dcmtk_storescp(work: Path, options: list[str]) -> Iterator[int]:
    out = work / "storescp-out"
    out.mkdir(parents=True)
    port = free_port()
    args = ["storescp", "-aet", "STORESCP", *options, "-od", str(out), str(port)]
    with _server(args, port, work / "storescp.log") as p:
        yield p


@contextmanager
def gateway_listener(work: Path) -> Iterator[int]:
    work.mkdir(parents=True)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("CXR_")}
    env |= {
        "CXR_DATA_DIR": str(work / "data"),
        "CXR_LISTENER_HOST": "127.0.0.1",
        "CXR_LISTENER_PORT": str(port),
        "CXR_STUDY_QUIET_SECONDS": "3600",
        "CXR_LOG_LEVEL": "WARNING",
    }
    args = [sys.executable, "-m", "service.cli", "listener"]
    with _server(args, port, work / "listener.log", cwd=REPO, env=env) as p:
        yield p


def count_rows(work: Path) -> int:
    with sqlite3.connect(work / "data" / "cxr.sqlite") as conn:
        (n,) = conn.execute("select count(*) from instances").fetchone()
        return int(n)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--count", type=int, default=100)
    parser.add_argument("--side", type=int, default=2048)
    parser.add_argument("--runs", type=int, default=1, help="repeat both sends; medians are reported")
    parser.add_argument("--keep", type=Path, help="work dir to keep (default: a temp dir, removed)")
    parser.add_argument("--storescu-arg", action="append", default=[], help="extra storescu option")
    args = parser.parse_args()
    if shutil.which("storescu") is None or shutil.which("storescp") is None:
        raise SystemExit("DCMTK storescu/storescp not on PATH")

    work = args.keep or Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    try:
        t0 = time.perf_counter()
        files = make_images(work / "images", args.count, args.side)
        total = sum(p.stat().st_size for p in files)
        print(
            f"made {len(files)} CR files, {total / len(files) / 1e6:.1f} MB each "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        times: dict[str, list[float]] = {"gateway": [], **{name: [] for name in DCMTK_CONFIGS}}
        for run in range(args.runs):
            run_dir = work / f"run-{run}"
            # Rotate the order so no receiver always gets the warmest page cache.
            order = list(times)
            order = order[run % len(order) :] + order[: run % len(order)]
            for n, which in enumerate(order):
                where = run_dir / f"{n}"
                if which == "gateway":
                    with gateway_listener(where) as port:
                        times[which].append(storescu(port, AE_TITLE, files, args.storescu_arg))
                    stored = count_rows(where)
                else:
                    with dcmtk_storescp(where, DCMTK_CONFIGS[which]) as port:
                        times[which].append(storescu(port, "STORESCP", files, args.storescu_arg))
                    stored = len(list((where / "storescp-out").iterdir()))
                if stored != len(files):
                    raise SystemExit(f"{which} stored {stored} of {len(files)}")
            print(f"run {run + 1}: " + ", ".join(f"{k} {v[-1]:.2f} s" for k, v in times.items()))
            shutil.rmtree(run_dir, ignore_errors=True)
        medians = {k: statistics.median(v) for k, v in times.items()}
        print(
            f"\nmedian of {args.runs} run(s), {len(files)} files, {total / 1e6:.0f} MB, one association each:"
        )
        for name, seconds in medians.items():
            note = " (fsync + commit before each 0x0000)" if name == "gateway" else " (no fsync)"
            print(f"  {name:<26} {seconds:6.2f} s  {total / seconds / 1e6:5.0f} MB/s{note}")
        for name in DCMTK_CONFIGS:
            print(f"  ratio gateway / {name}: {medians['gateway'] / medians[name]:.2f}")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
