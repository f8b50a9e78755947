"""Cross-study batching: concurrent callers share forward passes and get exactly their own rows back."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest
import torch

from monai_train.__main__ import init_bundle
from worker.inference.batcher import BatcherClosed, BatchingPredictor
from worker.inference.bundle import load_bundle
from worker.inference.predictor import Prediction, Predictor


class CountingPredictor(Predictor):
    """The real predictor, recording the size of every forward pass (and able to fail on demand)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.passes: list[int] = []
        self.fail_next = False

    def run(self, x: torch.Tensor) -> Prediction:
        self.passes.append(len(x))
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("planted failure")
        return super().run(x)


@pytest.fixture(scope="module")
def predictor(tmp_path_factory: pytest.TempPathFactory) -> CountingPredictor:
    out = tmp_path_factory.mktemp("bundle")
    init_bundle(out, seed=5)
    # Torch, so that the result does not depend on onnxruntime's batch-size-specific kernels.
    return CountingPredictor(load_bundle(out), backend="torch")


def _images(n: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.random((160, 150), dtype=np.float32) for _ in range(n)]


def _concurrently(batcher: BatchingPredictor, studies: list[list[np.ndarray]]) -> list[Prediction]:
    results: list[Prediction | None] = [None] * len(studies)
    start = threading.Barrier(len(studies))

    def call(i: int) -> None:
        start.wait()
        results[i] = batcher.predict(studies[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(studies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def test_concurrent_studies_share_passes_and_get_their_own_rows(predictor: CountingPredictor) -> None:
    studies = [_images(1 + i % 2, seed=i) for i in range(6)]  # 9 images from 6 "studies"
    alone = [predictor.predict(s) for s in studies]
    predictor.passes.clear()

    batcher = BatchingPredictor(predictor, max_batch=16, max_wait_seconds=1.0)
    try:
        together = _concurrently(batcher, studies)
    finally:
        batcher.close()

    assert sum(predictor.passes) == 9
    assert len(predictor.passes) < 6, predictor.passes  # shared passes, not one per study
    assert max(r.batch_requests for r in together) > 1
    for mine, ref in zip(together, alone, strict=True):
        assert mine.probabilities.shape == ref.probabilities.shape
        np.testing.assert_allclose(mine.probabilities, ref.probabilities, atol=1e-5)
        np.testing.assert_allclose(mine.cams, ref.cams, atol=1e-4)


def test_a_study_larger_than_a_batch_is_split_and_reassembled(predictor: CountingPredictor) -> None:
    images = _images(5, seed=42)
    ref = predictor.predict(images)
    predictor.passes.clear()
    batcher = BatchingPredictor(predictor, max_batch=2, max_wait_seconds=0.0)
    try:
        got = batcher.predict(images)
    finally:
        batcher.close()
    assert predictor.passes == [2, 2, 1]
    np.testing.assert_allclose(got.probabilities, ref.probabilities, atol=1e-5)


def test_a_full_batch_does_not_wait_and_a_lone_one_waits_at_most_max_wait(
    predictor: CountingPredictor,
) -> None:
    images = _images(1, seed=1)
    predictor.predict(images)  # warm
    t0 = time.monotonic()
    predictor.predict(images)
    forward = time.monotonic() - t0

    full = BatchingPredictor(predictor, max_batch=1, max_wait_seconds=30.0)
    try:
        t0 = time.monotonic()
        full.predict(images)
        assert time.monotonic() - t0 < forward + 5  # not the 30 s wait
    finally:
        full.close()

    lone = BatchingPredictor(predictor, max_batch=8, max_wait_seconds=0.3)
    try:
        t0 = time.monotonic()
        lone.predict(images)
        took = time.monotonic() - t0
    finally:
        lone.close()
    assert 0.3 <= took < 0.3 + forward + 5


def test_a_failed_pass_fails_its_callers_and_the_batcher_goes_on(predictor: CountingPredictor) -> None:
    batcher = BatchingPredictor(predictor, max_batch=4, max_wait_seconds=0.0)
    try:
        predictor.fail_next = True
        with pytest.raises(RuntimeError, match="planted failure"):
            batcher.predict(_images(1, seed=3))
        assert batcher.predict(_images(1, seed=3)).probabilities.shape == (1, 14)
    finally:
        batcher.close()


def test_close_finishes_queued_work_then_refuses(predictor: CountingPredictor) -> None:
    batcher = BatchingPredictor(predictor, max_batch=1, max_wait_seconds=0.0)
    before = len(predictor.passes)
    studies = [_images(1, seed=i) for i in range(3)]
    results: list[Prediction] = []
    threads = [threading.Thread(target=lambda s=s: results.append(batcher.predict(s))) for s in studies]
    for t in threads:
        t.start()
    while len(predictor.passes) + batcher._queue.qsize() < 3 + before:  # all three handed in
        time.sleep(0.005)
    batcher.close()
    for t in threads:
        t.join(60)
    assert len(results) == 3
    with pytest.raises(BatcherClosed):
        batcher.predict(studies[0])
