"""Run a Python program whose wall clock is stepped by a file: the fault suite's "clock jump of the
reconciler host", for that one process only.

    python -m tests.support.skewed_clock OFFSET_FILE -m service.cli listener

OFFSET_FILE holds seconds (``3600``, ``-3600``, ``0``) added to ``time.time()``/``time.time_ns()`` and to
``datetime.now()``/``utcnow()``; it is read again every 0.2 s, so a test steps the clock by writing it.
The monotonic clock is left alone, as an NTP step leaves it. (libfaketime 0.9.10 would do this for the
whole process, but it breaks Python's ``time.sleep``, which uses an absolute monotonic deadline.)
"""

from __future__ import annotations

import datetime as _dt
import runpy
import sys
import time as _time

_OFFSET_FILE = sys.argv[1]
_real_time, _real_time_ns, _monotonic = _time.time, _time.time_ns, _time.monotonic
_cache = [0.0, -1.0]  # offset, when read (monotonic)


def offset() -> float:
    now = _monotonic()
    if now - _cache[1] > 0.2:
        try:
            with open(_OFFSET_FILE) as fh:
                _cache[0] = float(fh.read().strip() or 0)
        except (OSError, ValueError):
            pass
        _cache[1] = now
    return _cache[0]


class _SteppedDatetime(_dt.datetime):
    @classmethod
    def now(cls, tz: _dt.tzinfo | None = None) -> _SteppedDatetime:
        return super().now(tz) + _dt.timedelta(seconds=offset())  # type: ignore[return-value]

    @classmethod
    def utcnow(cls) -> _SteppedDatetime:
        return super().utcnow() + _dt.timedelta(seconds=offset())  # type: ignore[return-value]


_time.time = lambda: _real_time() + offset()
_time.time_ns = lambda: _real_time_ns() + int(offset() * 1e9)
_dt.datetime = _SteppedDatetime  # type: ignore[misc]

if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[2] != "-m":
        raise SystemExit(__doc__)
    module = sys.argv[3]
    sys.argv = [module, *sys.argv[4:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
