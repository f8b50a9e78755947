"""Dynamic batching across studies: tasks in one worker process share forward passes.

A GPU is used well only with batches, but a chest study has one or two images. On a worker running
its tasks in threads (``CXR_WORKER_POOL=threads``), each task prepares its own images (CPU work, in
its own thread) and hands the tensor to one inference thread, which waits at most ``max_wait`` for
other tasks' images, runs up to ``max_batch`` images in one pass and hands each task its rows back.
The tasks themselves stay one study each: acknowledgement, retries and idempotency are unchanged.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch
from numpy.typing import NDArray

from worker.inference.bundle import Bundle
from worker.inference.predictor import Prediction, Predictor

log = logging.getLogger(__name__)


class BatcherClosed(RuntimeError):
    """The batcher was shut down before this request ran."""


@dataclass
class _Request:
    x: torch.Tensor
    done: Future[Prediction] = field(default_factory=Future)


_STOP = object()


class BatchingPredictor:
    """A Predictor front that coalesces concurrent ``predict`` calls into shared forward passes."""

    def __init__(self, predictor: Predictor, max_batch: int, max_wait_seconds: float) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.predictor = predictor
        self.max_batch = max_batch
        self.max_wait = max(0.0, max_wait_seconds)
        self._queue: queue.Queue[_Request | object] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()  # no request goes in behind the stop marker
        self._carry: _Request | None = None
        self._thread = threading.Thread(target=self._loop, name="inference-batcher", daemon=True)
        self._thread.start()

    @property
    def bundle(self) -> Bundle:
        return self.predictor.bundle

    @property
    def description(self) -> dict[str, str]:
        return self.predictor.description

    def predict(self, images: Sequence[NDArray[np.float32]]) -> Prediction:
        x = self.predictor.prepare(images)  # in the caller's thread: CPU work runs in parallel
        # A study larger than one batch goes in several requests (they may share passes with others).
        requests = [_Request(chunk) for chunk in torch.split(x, self.max_batch)]
        with self._lock:
            if self._closed:
                raise BatcherClosed("the inference batcher is shut down")
            for request in requests:
                self._queue.put(request)
        parts = [request.done.result() for request in requests]
        return Prediction(
            probabilities=np.concatenate([p.probabilities for p in parts]),
            cams=np.concatenate([p.cams for p in parts]),
            batch_images=max(p.batch_images for p in parts),
            batch_requests=max(p.batch_requests for p in parts),
        )

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, then stop the inference thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _collect(self, first: _Request) -> tuple[list[_Request], bool]:
        """``first`` plus whatever arrives within ``max_wait`` and fits; True when asked to stop."""
        batch, size = [first], len(first.x)
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            assert isinstance(item, _Request)
            if size + len(item.x) > self.max_batch:
                # Does not fit: it opens the next batch, so it never waits more than one pass extra.
                self._carry = item
                break
            batch.append(item)
            size += len(item.x)
        return batch, False

    def _loop(self) -> None:
        stop = False
        while not stop or self._carry is not None:
            if self._carry is not None:
                first, self._carry = self._carry, None
            else:
                item = self._queue.get()
                if item is _STOP:
                    break
                assert isinstance(item, _Request)
                first = item
            if stop:
                batch = [first]
            else:
                batch, stop = self._collect(first)
            self._run(batch)
        # Whatever is left after the stop was asked for still runs: a caller is waiting on it.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if isinstance(item, _Request):
                self._run([item])

    def _run(self, batch: list[_Request]) -> None:
        try:
            pred = self.predictor.run(torch.cat([r.x for r in batch]))
        except Exception as exc:  # each waiting task fails its own job with it
            for request in batch:
                request.done.set_exception(exc)
            return
        start = 0
        for request in batch:
            end = start + len(request.x)
            request.done.set_result(
                Prediction(
                    probabilities=pred.probabilities[start:end],
                    cams=pred.cams[start:end],
                    batch_images=pred.batch_images,
                    batch_requests=len(batch),
                )
            )
            start = end
        log.debug("inference batch images=%d requests=%d", pred.batch_images, len(batch))
