"""What a worker process builds once at start-up and reuses across tasks: settings, database sessions,
the predictor and the pixel decoder (the last two on first use, in the process that uses them)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
from numpy.typing import NDArray
from sqlalchemy.orm import Session, sessionmaker

from service.core.settings import Settings
from worker.dicom.decoder import DecodeLimits, IsolatedDecoder
from worker.dicom.gate import GateRules, SizeLimits
from worker.inference.batcher import BatchingPredictor
from worker.inference.bundle import Bundle, load_bundle
from worker.inference.predictor import Prediction, Predictor

log = logging.getLogger(__name__)


class Inference(Protocol):
    """A Predictor, or a BatchingPredictor in front of one."""

    @property
    def bundle(self) -> Bundle: ...

    @property
    def description(self) -> dict[str, str]: ...

    def predict(self, images: Sequence[NDArray[np.float32]]) -> Prediction: ...


@dataclass
class Runtime:
    """Thread-safe: tasks may be threads of one process."""

    settings: Settings
    sessions: sessionmaker[Session]
    _predictor: Inference | None = field(default=None, init=False)
    _decoder: IsolatedDecoder | None = field(default=None, init=False)
    _lanes: dict[tuple[str, str, int], ThreadPoolExecutor] = field(default_factory=dict, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @property
    def predictor(self) -> Inference:
        with self._lock:
            if self._predictor is None:
                self._predictor = make_inference(self.settings)
            return self._predictor

    @property
    def decoder(self) -> IsolatedDecoder:
        """Pixel decoding in limited child processes (started on first use, in the process using it)."""
        with self._lock:
            if self._decoder is None:
                s = self.settings
                self._decoder = IsolatedDecoder(
                    s.tmp_dir / "decode", DecodeLimits(s.decode_timeout_seconds, s.decode_memory_limit_bytes)
                )
            return self._decoder

    def use_bundle(self, path: Path) -> bool:
        """Serve ``path`` from the next prediction on (an admin promoted it); True when that changed."""
        with self._lock:
            if self.settings.model_bundle.resolve() == path.resolve():
                return False
            self.settings = self.settings.model_copy(update={"model_bundle": path})
            old, self._predictor = self._predictor, None
        if isinstance(old, BatchingPredictor):
            old.close()
        return True

    def warm_up(self) -> None:
        """Load the model and run it once, and start a decoder process: the first study waits for
        neither. Runs beside the first tasks, which wait for the model it is loading."""
        started = time.monotonic()
        try:
            image = np.random.default_rng(0).random((256, 256), dtype=np.float32)
            self.predictor.predict([image])
            self.decoder.warm()
        except Exception as exc:  # the first study loads them again, and fails with a coded reason
            log.warning("warm-up failed (%s); the first study loads the model", type(exc).__name__)
            return
        log.info("warmed up in %.1f s", time.monotonic() - started)

    def lane(self, target: tuple[str, str, int]) -> ThreadPoolExecutor:
        """The one sending thread of a destination (started on first use, in the process using it): a
        slow or refusing destination holds up only its own outputs, never another's."""
        with self._lock:
            lane = self._lanes.get(target)
            if lane is None:
                lane = ThreadPoolExecutor(1, thread_name_prefix=f"deliver-{target[0]}")
                self._lanes[target] = lane
            return lane

    def close(self) -> None:
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:  # sends under way finish (each bounded by the sender's timeouts)
            lane.shutdown(wait=True)
        with self._lock:
            if isinstance(self._predictor, BatchingPredictor):
                self._predictor.close()
            self._predictor = None
            if self._decoder is not None:
                self._decoder.close()
            self._decoder = None

    @property
    def size_limits(self) -> SizeLimits:
        return SizeLimits(self.settings.max_image_pixels, self.settings.max_instance_bytes)

    @property
    def gate_rules(self) -> GateRules:
        s = self.settings
        return GateRules.from_lists(
            s.gate_modalities, s.gate_body_parts, s.gate_view_positions, s.gate_min_side
        )

    @property
    def bundle(self) -> Bundle:
        return self.predictor.bundle


def make_inference(settings: Settings) -> Inference:
    """The worker's predictor, behind a cross-study batcher where tasks share this process."""
    s = settings
    predictor = Predictor(
        load_bundle(s.model_bundle),
        device=s.inference_device,
        threads=s.torch_threads,
        backend=s.inference_backend,
        precision=s.inference_precision,
    )
    log.info(
        "model bundle=%s version=%s device=%s precision=%s backend=%s",
        predictor.bundle.name,
        predictor.bundle.version,
        predictor.device,
        predictor.precision,
        predictor.backend,
    )
    if s.worker_pool == "threads" and s.worker_concurrency > 1 and s.inference_max_batch > 1:
        log.info(
            "batching across studies max_batch=%d max_wait_ms=%.0f",
            s.inference_max_batch,
            s.inference_max_wait_ms,
        )
        return BatchingPredictor(predictor, s.inference_max_batch, s.inference_max_wait_ms / 1000)
    return predictor
