"""The shared test Redis's claim protocol: a caller (a test, a benchmark) gets a logical DB of its own.

Logical DBs 5..14 are handed out; DB 15 only holds the claim keys, so concurrent runs on the same Redis
(several engineers / CI jobs / a benchmark beside the suite) never FLUSHDB each other's database.
"""

from __future__ import annotations

import os
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    import redis

REDIS_HOST = os.environ.get("CXR_TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("CXR_TEST_REDIS_PORT", "6379"))
REDIS_TEST_DBS = range(5, 15)
REDIS_LOCK_DB = 15


def lock_client() -> redis.Redis:
    import redis

    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_LOCK_DB, socket_connect_timeout=5)


@contextmanager
def claimed_db(
    lock: redis.Redis, busy: Callable[[str], NoReturn], token_prefix: str = "", wait_seconds: float = 60.0
) -> Iterator[str]:
    """The URL of an empty logical DB claimed for this caller alone (FLUSHDB before and after);
    ``busy(message)`` when every DB stays claimed for ``wait_seconds``."""
    import redis

    token = f"{token_prefix}{os.getpid()}-{secrets.token_hex(4)}"
    db: int | None = None
    deadline = time.monotonic() + wait_seconds
    while db is None:
        candidates = list(REDIS_TEST_DBS)
        secrets.SystemRandom().shuffle(candidates)
        # The TTL frees a DB whose holder was killed before teardown.
        db = next(
            (n for n in candidates if lock.set(f"cxr-test:redis-db:{n}", token, nx=True, ex=3600)), None
        )
        if db is None:
            if time.monotonic() > deadline:
                busy(f"all Redis test DBs {REDIS_TEST_DBS} are claimed by other test runs")
            time.sleep(0.2)
    client = redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db)
    try:
        client.flushdb()
        yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    finally:
        client.flushdb()
        client.close()
        # Release only our own claim (compare-and-delete, atomic on the server).
        lock.eval(
            "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0",
            1,
            f"cxr-test:redis-db:{db}",
            token,
        )
