"""Throughput benchmark: full-size CR studies (2048 x 2500, 12-bit) through ``cxr-gateway serve``.

    .venv/bin/python bench/throughput_bench.py serve [--studies 500] [--code DIR ...] [--json OUT]
    .venv/bin/python bench/throughput_bench.py stages [--studies 5] [--code DIR]
    .venv/bin/python bench/throughput_bench.py profile [--code DIR]

``serve``: Orthanc as the PACS, ``serve`` on its embedded defaults, N one-image studies (NIH pixels
upscaled into CR data sets, each its own study) sent by DCMTK ``storescu`` one association each; from the
first send to the last output listed by Orthanc: studies/min, and studies/min per CPU core (the cores
this machine has: ``serve`` runs everything on them). ``--code`` may be given several times: each checkout
runs in turn on the same files in the same run (``git worktree add /tmp/base <commit>`` for the previous
commit), so the ratio is measured, not remembered.

``stages``: the per-stage cost of one study in one process (``--code``'s worker modules): read and gate,
decode (the isolated decoder process), model (probabilities and CAMs in one pass), regions, SR, results
report, SC, delivery (C-STORE to Orthanc), each timed with ``time.perf_counter`` over N studies.

``profile``: cProfile of one study's analysis (the top 25 by cumulative time).
Lives outside ``tests/`` so pytest never collects it.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
ROWS, COLUMNS = 2500, 2048
OUTPUTS = 3  # measurement SR, results report SR, heatmap SC


def make_studies(n: int, out: Path) -> list[Path]:
    """``n`` one-image CR studies of ROWS x COLUMNS 12-bit pixels (NIH images, upscaled); kept in ``out``
    between runs, so every checkout gets the same files."""
    from tests.support.site import make_studies as write

    files = sorted(out.glob("TP-*.dcm"))[:n]
    return files if len(files) == n else write(n, out, COLUMNS, "TP", rows=ROWS, source="nih-cxr14-dev")


def _with_code(code: Path | None, argv: list[str]) -> dict[str, Any]:
    """Run this script's ``argv`` in a child whose imports come from ``code``; its JSON answer."""
    env = {**os.environ, "PYTHONPATH": str(code or REPO)}
    done = subprocess.run(
        [sys.executable, __file__, *argv, "--child"], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"child failed:\n{done.stderr[-4000:]}")
    answer: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answer


# ------------------------------------------------------------------------------------------ serve


def run_serve(files: list[Path], workdir: Path) -> dict[str, Any]:
    import httpx
    from latency_bench import HARNESS_OVERRIDES, wait_for_worker  # beside this script
    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from service.core.models import Job
    from tests.support.dcmtk import storescu
    from tests.support.gateway import GatewayProcesses
    from tests.support.orthanc import OrthancServer

    with OrthancServer(workdir=workdir / "orthanc") as pacs:
        destinations = [{"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port}]
        gw = GatewayProcesses(workdir / "gateway", destinations=destinations)
        for key in HARNESS_OVERRIDES:
            gw.env.pop(key, None)
        with gw:
            wait_for_worker(gw)
            cpu0 = _cpu_seconds()
            started = time.monotonic()
            for path in files:
                done = storescu("127.0.0.1", gw.listener_port, [path], called_aet=gw.ae_title, verbose=False)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-2000:])
            sent = time.monotonic() - started
            want = OUTPUTS * len(files)
            with httpx.Client(base_url=pacs.url, timeout=10) as client:
                while (have := int(client.get("/statistics").json()["CountInstances"])) < want:
                    if time.monotonic() - started > 60 + 30 * len(files):
                        raise TimeoutError(f"{have}/{want} outputs in the PACS\n{gw.log_tail()}")
                    time.sleep(0.2)
            elapsed = time.monotonic() - started
            cpu = _cpu_seconds() - cpu0
            engine = create_engine(f"sqlite:///{gw.data_dir / 'cxr.sqlite'}")
            with Session(engine) as session:
                runs = [
                    (j.finished_at - j.started_at).total_seconds()
                    for j in session.scalars(select(Job))
                    if j.finished_at and j.started_at
                ]
            engine.dispose()
    cores = os.cpu_count() or 1
    return {
        "studies": len(files),
        "seconds": round(elapsed, 1),
        "send_seconds": round(sent, 1),
        "studies_per_min": round(60 * len(files) / elapsed, 2),
        "studies_per_min_per_core": round(60 * len(files) / elapsed / cores, 2),
        "job_seconds_median": round(statistics.median(runs), 3),
        "machine_cpu_seconds_per_study": round(cpu / len(files), 2),
        "load_after": os.getloadavg(),
    }


def _cpu_seconds() -> float:
    """CPU seconds the whole machine has spent (user + system, every core), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    user, nice, system = (int(v) for v in fields[:3])
    return (user + nice + system) / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------------------ stages


def _runtime(workdir: Path) -> Any:
    from service.core.db import make_session_factory, migrate
    from service.core.settings import load_settings
    from worker.runtime import Runtime

    settings = load_settings(data_dir=workdir / "data")
    migrate(settings)
    return Runtime(settings=settings, sessions=make_session_factory(settings))


def run_stages(files: list[Path], workdir: Path) -> dict[str, Any]:
    """Each stage of each study timed in this process (the first study warms up and is left out)."""
    from pydicom import dcmread

    from tests.support.orthanc import OrthancServer
    from worker.analysis import image_findings
    from worker.dicom.gate import check_header, check_size
    from worker.outputs import ImageResult, StudyOutputs, algorithm_info, image_outputs

    rt = _runtime(workdir)
    times: dict[str, list[float]] = {}

    def timed(stage: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        times.setdefault(stage, []).append(time.perf_counter() - t0)
        return value

    with OrthancServer(workdir=workdir / "orthanc") as pacs:
        peer = {"ae_title": pacs.aet, "host": "127.0.0.1", "port": pacs.dicom_port, "calling_ae_title": "B"}
        bundle = rt.bundle
        for n, path in enumerate([files[0], *files]):
            if n == 1:
                times.clear()  # the first pass warmed up
            ds = timed("read+gate", lambda p=path: _read_and_gate(p, rt, dcmread, check_size, check_header))
            display = timed("decode", lambda p=path: rt.decoder.decode(p))
            prediction = timed("model+CAMs", lambda d=display: rt.predictor.predict([d.pixels]))
            findings, heatmaps, regions, _ = timed(
                "regions",
                lambda d=display, pr=prediction: image_findings(
                    bundle, pr.probabilities[0], pr.cams[0], d.pixels.shape
                ),
            )
            study = StudyOutputs(
                workdir / "out" / f"{n}",
                rt.settings.uid_prefix,
                str(ds.StudyInstanceUID),
                algorithm_info(bundle),
            )
            image = ImageResult(ds, display, findings, heatmaps, regions)
            outputs = timed(
                "SR+report+SC (built, written)", lambda i=image, st=study: image_outputs(i, 1, st, set())[0]
            )
            timed("delivery (all outputs)", lambda o=outputs: _deliver([x.path for x in o], peer))
    rt.close()
    return {stage: round(statistics.median(v), 4) for stage, v in times.items()}


def _deliver(paths: list[Path], peer: dict[str, Any]) -> None:
    """As the checkout delivers a study's outputs: over one association when it can, else one each."""
    from service.dicomnet import scu

    if hasattr(scu, "c_store_many"):
        assert not any(scu.c_store_many(paths, **peer))
    else:
        for path in paths:
            scu.c_store(path, **peer)


def _read_and_gate(path: Path, rt: Any, dcmread: Any, check_size: Any, check_header: Any) -> Any:
    ds = dcmread(path, defer_size=1024)
    check_size(ds, path.stat().st_size, rt.size_limits)
    check_header(ds, rt.gate_rules)
    return ds


def run_profile(files: list[Path], workdir: Path) -> dict[str, Any]:
    from worker.analysis import analyse

    rt = _runtime(workdir)
    rows = [("1", files[0])]
    analyse(rows, "1.2.3", "warm", rt)  # model loaded, decoder started
    profiler = cProfile.Profile()
    profiler.enable()
    analyse(rows, "1.2.3", "profiled", rt)
    profiler.disable()
    rt.close()
    out = workdir / "profile.txt"
    with out.open("w") as fh:
        pstats.Stats(profiler, stream=fh).sort_stats("cumulative").print_stats(25)
    return {"profile": out.read_text()}


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["serve", "stages", "profile"])
    parser.add_argument("--studies", type=int, default=None)
    parser.add_argument("--code", type=Path, action="append", help="checkout(s) to run (PYTHONPATH)")
    parser.add_argument("--files", type=Path, default=Path(tempfile.gettempdir()) / "cxr-throughput-files")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    n = args.studies or {"serve": 500, "stages": 5, "profile": 1}[args.mode]
    if not args.child:  # a child's imports come from its checkout (PYTHONPATH)
        sys.path.insert(0, str(REPO))
    files = make_studies(n, args.files)
    if args.child:
        workdir = Path(tempfile.mkdtemp(prefix=f"cxr-throughput-{args.mode}-"))
        run = {"serve": run_serve, "stages": run_stages, "profile": run_profile}[args.mode]
        print(json.dumps(run(files, workdir)))
        return
    results = {}
    print(f"load before: {os.getloadavg()} cores={os.cpu_count()} studies={n}", flush=True)
    for code in args.code or [None]:
        argv = [args.mode, "--studies", str(n), "--files", str(args.files)]
        answer = _with_code(code, argv)
        results[str(code or REPO)] = answer
        if args.mode == "profile":
            print(f"== {code or REPO}\n{answer['profile']}", flush=True)
        else:
            print(f"== {code or REPO}: {json.dumps(answer)}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
