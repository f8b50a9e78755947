"""The suite's one way to wait: poll a predicate against a deadline, never sleep a fixed window.

A fixed sleep either wastes time or, on a slow machine, passes before the thing it waits for happened.
To assert that something did NOT happen, first wait for a positive event that proves the system got past
the point where it would have happened (a job finished with all its deliveries, a duplicate logged).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str,
    *,
    interval: float = 0.1,
    check: Callable[[], None] | None = None,
    detail: Callable[[], str] | None = None,
) -> T:
    """Poll ``predicate`` until it returns something truthy, and return that.

    ``check`` runs before each poll (to raise at once when a process it depends on died); ``detail`` adds
    context (a log tail) to the TimeoutError, which names ``what`` and the predicate's last value.
    """
    deadline = time.monotonic() + timeout
    while True:
        if check is not None:
            check()
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            extra = f"\n{detail()}" if detail is not None else ""
            raise TimeoutError(f"{what}: not within {timeout:g} s (last value {value!r}){extra}")
        time.sleep(interval)
