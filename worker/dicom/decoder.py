"""Pixel decoding in child processes, so that no codec can take the worker down or hold it.

A C decoder cannot be interrupted by a signal handler (SIGALRM only runs Python code between bytecodes)
and may reserve whatever a hostile codestream declares. So each image is decoded by a small child
process (``python -m worker.dicom.decoder``) that runs under an address-space limit (RLIMIT_AS: an
allocation past it fails inside the child) and is killed (SIGKILL) when it runs past the time limit.
The child writes the display pixels to a ``.npy`` file under the data directory and answers one JSON
line per request; the parent reads the file back. Children are reused (their start-up costs more than
most decodes) until one fails, times out or dies; one is kept per concurrent caller.

The child's standard error is discarded: decoder libraries quote header values in their warnings.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np

from service.core.status import ReasonCode
from worker.dicom.pixels import DisplayImage, PixelDataError

__all__ = ["DecodeLimits", "DecodeTimeout", "IsolatedDecoder"]

log = logging.getLogger(__name__)

# Threads in the child: one each, so that the address-space limit is spent on pixels, not on thread
# stacks and per-thread arenas of BLAS and malloc.
_CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "MALLOC_ARENA_MAX": "2",
    "PYTHONWARNINGS": "ignore",
}
_START_TIMEOUT = 60.0  # interpreter and imports, on a loaded machine


class DecodeTimeout(Exception):
    """A codec ran past its time limit on one image; its process was killed."""


@dataclass(frozen=True)
class DecodeLimits:
    timeout_seconds: float
    memory_bytes: int


class _Child:
    """One decoder process and its pipes."""

    def __init__(self, memory_bytes: int) -> None:
        env = {**os.environ, **_CHILD_ENV}
        self.proc = subprocess.Popen(  # our own interpreter and module, no shell
            [sys.executable, "-m", "worker.dicom.decoder", str(memory_bytes)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            env=env,
            close_fds=True,
        )
        self._buffer = b""
        ready = self._read_line(time.monotonic() + _START_TIMEOUT)
        if ready is None or json.loads(ready).get("ready") is not True:
            self.kill()
            raise PixelDataError(ReasonCode.PIXEL_DECODE_ERROR, "the decoder process did not start")

    def request(self, path: Path, out: Path, timeout: float) -> dict[str, Any] | None:
        """Send one request; the answer, or None when the child died. Raises DecodeTimeout."""
        stdin = self.proc.stdin
        assert stdin is not None
        try:
            stdin.write(json.dumps({"path": str(path), "out": str(out)}).encode() + b"\n")
            stdin.flush()
        except OSError:
            return None
        deadline = time.monotonic() + timeout if timeout > 0 else None
        line = self._read_line(deadline)
        if line is None:
            return None
        answer: dict[str, Any] = json.loads(line)
        return answer

    def _read_line(self, deadline: float | None) -> bytes | None:
        stdout = self.proc.stdout
        assert stdout is not None
        fd = stdout.fileno()
        while b"\n" not in self._buffer:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            readable, _, _ = select.select([fd], [], [], wait)
            if not readable:
                raise DecodeTimeout
            chunk = os.read(fd, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()

    @property
    def returncode(self) -> int | None:
        return self.proc.poll()


class IsolatedDecoder:
    """Decode DICOM files to display pixels in limited child processes (thread-safe)."""

    def __init__(self, scratch_dir: Path, limits: DecodeLimits) -> None:
        self.scratch_dir = scratch_dir
        self.limits = limits
        self._idle: list[_Child] = []
        self._lock = threading.Lock()
        self._names = itertools.count()
        self._pid = os.getpid()

    def decode(self, path: Path) -> DisplayImage:
        """The display pixels of the DICOM file at ``path``.

        Raises PixelDataError (with a ReasonCode) when the image cannot be decoded or is not an image,
        DecodeTimeout when decoding ran past the time limit.
        """
        self.scratch_dir.mkdir(parents=True, exist_ok=True)
        out = self.scratch_dir / f"{os.getpid()}-{threading.get_ident()}-{next(self._names)}.npy"
        child = self._take()
        keep = False
        try:
            try:
                answer = child.request(path, out, self.limits.timeout_seconds)
            except DecodeTimeout:
                log.warning(
                    "pixel decode killed after %.1fs reason=%s",
                    self.limits.timeout_seconds,
                    ReasonCode.PIXEL_DECODE_TIMEOUT,
                )
                raise
            if answer is None:
                code = child.returncode
                raise PixelDataError(
                    ReasonCode.PIXEL_DECODE_MEMORY
                    if code == -signal.SIGKILL
                    else ReasonCode.PIXEL_DECODE_ERROR,
                    f"the decoder process died (exit status {code})",
                )
            if not answer.get("ok"):
                reason = ReasonCode(str(answer.get("reason")))
                # A child that ran out of memory may be left in any state: start afresh next time.
                keep = reason != ReasonCode.PIXEL_DECODE_MEMORY
                raise PixelDataError(reason, str(answer.get("message", "")))
            pixels = np.load(out, allow_pickle=False)
            keep = True
            return DisplayImage(
                pixels=np.ascontiguousarray(pixels, dtype=np.float32),
                inverted_by_label=bool(answer["inverted_by_label"]),
                inverted_by_heuristic=bool(answer["inverted_by_heuristic"]),
            )
        finally:
            out.unlink(missing_ok=True)
            if keep:
                self._give_back(child)
            else:
                child.kill()

    def warm(self) -> None:
        """Start a decoder process now (a worker's start-up), so the first image does not wait for one."""
        self._give_back(self._take())

    def close(self) -> None:
        with self._lock:
            children, self._idle = self._idle, []
        if os.getpid() != self._pid:
            return  # a forked copy: the children belong to the parent
        for child in children:
            child.kill()

    def _take(self) -> _Child:
        with self._lock:
            if os.getpid() != self._pid:
                # Forked (a prefork pool child): the pipes are the parent's; start our own children.
                self._idle, self._pid = [], os.getpid()
            while self._idle:
                child = self._idle.pop()
                if child.returncode is None:
                    return child
        return _Child(self.limits.memory_bytes)

    def _give_back(self, child: _Child) -> None:
        with self._lock:
            self._idle.append(child)


# ---------------------------------------------------------------------------------------------- child


def _serve(memory_bytes: int, requests: IO[bytes], answers: IO[bytes]) -> None:
    import resource
    import warnings

    import pydicom

    from worker.dicom.pixels import read_display_pixels

    warnings.simplefilter("ignore")
    logging.disable(logging.CRITICAL)
    # After the imports: the limit is for the image, and the interpreter is already in it.
    resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))

    def answer(message: dict[str, Any]) -> None:
        answers.write(json.dumps(message).encode() + b"\n")
        answers.flush()

    answer({"ready": True})
    for line in requests:
        request = json.loads(line)
        try:
            ds = pydicom.dcmread(request["path"])
            display = read_display_pixels(ds)
            np.save(request["out"], display.pixels, allow_pickle=False)
        except MemoryError:
            answer({"ok": False, "reason": str(ReasonCode.PIXEL_DECODE_MEMORY), "message": "out of memory"})
            return
        except PixelDataError as exc:
            answer({"ok": False, "reason": str(exc.reason), "message": str(exc)[:300]})
            continue
        except Exception as exc:  # a file pydicom cannot even parse
            answer({"ok": False, "reason": str(ReasonCode.PIXEL_DECODE_ERROR), "message": type(exc).__name__})
            continue
        answer(
            {
                "ok": True,
                "inverted_by_label": display.inverted_by_label,
                "inverted_by_heuristic": display.inverted_by_heuristic,
            }
        )
        del ds, display


if __name__ == "__main__":
    # Our own stdout is the answer channel: nothing else may write to it.
    _answers = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    sys.stdout = sys.stderr
    _serve(int(sys.argv[1]), sys.stdin.buffer, _answers)
