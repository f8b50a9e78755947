"""GPU workers (``pytest -m gpu`` on a CUDA machine; skipped elsewhere, failed under CI).

- The thread-pool worker batches studies across tasks on the GPU in bf16 through ``cxr-gateway serve``:
  many one-image studies sent at once come back analysed, their passes shared between studies.
- The inference side alone keeps up with at least 1,000 studies a minute per GPU (one image each, 16
  threads calling the batcher as the thread pool's tasks do).
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import select

from service.core.db import make_session_factory
from service.core.models import Job
from service.core.settings import DEFAULT_BUNDLE, load_settings
from service.core.status import JobStatus
from tests.support.dcmtk import storescu
from tests.support.gateway import GatewayProcesses
from tests.support.peers import require_peer, unavailable
from tests.support.studies import with_fresh_uids
from tests.support.waiting import wait_until

pytestmark = pytest.mark.gpu

GPU_ENV = {
    "CXR_INFERENCE_DEVICE": "cuda",
    "CXR_INFERENCE_PRECISION": "bf16",
    "CXR_WORKER_POOL": "threads",
    "CXR_WORKER_CONCURRENCY": "16",
    "CXR_INFERENCE_MAX_BATCH": "16",
    "CXR_INFERENCE_MAX_WAIT_MS": "20",
}


def _require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        unavailable("no CUDA device: the gpu tests need one")


def test_the_thread_pool_worker_batches_studies_across_tasks_on_the_gpu(
    tmp_path: Path, shared_dir: Path
) -> None:
    _require_cuda()
    require_peer("dcmtk")
    files = [
        with_fresh_uids(shared_dir / "dicom/chest/cr-pa-mono1-explicit-le.dcm", tmp_path / f"{i}.dcm")
        for i in range(48)
    ]
    with GatewayProcesses(tmp_path / "gw", env=GPU_ENV) as gw:
        sessions = make_session_factory(load_settings(data_dir=gw.data_dir))
        # Eight senders at once, as a department's modalities would: the jobs overlap on the worker.
        with ThreadPoolExecutor(8) as senders:
            done = list(
                senders.map(
                    lambda p: storescu("127.0.0.1", gw.listener_port, [p], called_aet=gw.ae_title),
                    files,
                )
            )
        assert all(d.returncode == 0 for d in done)

        def finished() -> list[Job] | None:
            with sessions() as s:
                jobs = list(s.scalars(select(Job)))
            return jobs if len(jobs) == len(files) and all(j.status == JobStatus.DONE for j in jobs) else None

        jobs = wait_until(finished, 300, "every study done", interval=0.5, detail=gw.log_tail)
    inference = [j.result["inference"] for j in jobs]  # type: ignore[index]
    assert {i["device"] for i in inference} == {"cuda"}
    assert {i["precision"] for i in inference} == {"bf16"}
    assert max(int(i["batch_studies"]) for i in inference) > 1, "no pass was shared between studies"


def test_inference_keeps_up_with_a_thousand_studies_a_minute_per_gpu() -> None:
    _require_cuda()
    from worker.inference.batcher import BatchingPredictor
    from worker.inference.bundle import load_bundle
    from worker.inference.predictor import Predictor

    predictor = Predictor(load_bundle(DEFAULT_BUNDLE), device="cuda", precision="bf16", backend="torch")
    batcher = BatchingPredictor(predictor, max_batch=32, max_wait_seconds=0.01)
    rng = np.random.default_rng(0)
    # Display images as the decoder hands them over (the bundle's preprocessing resizes them).
    images = [rng.random((1024, 1024), dtype=np.float32) for _ in range(16)]
    lock = threading.Lock()
    count = 0

    def study(i: int) -> None:
        nonlocal count
        batcher.predict([images[i % len(images)]])
        with lock:
            count += 1

    try:
        with ThreadPoolExecutor(16) as pool:
            list(pool.map(study, range(64)))  # warm-up: kernels, allocator
            count = 0
            started = time.monotonic()
            list(pool.map(study, range(2000)))
            per_minute = count / (time.monotonic() - started) * 60
    finally:
        batcher.close()
    print(f"GPU inference: {per_minute:.0f} one-image studies/min (bf16, batches up to 32)")
    assert per_minute >= 1000
