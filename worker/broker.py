"""A worker that loses its broker either reconnects or dies as lost, never as a clean stop.

Two things go wrong with Celery on Redis when the broker drops (kill -9, a restart from its AOF):

- kombu's Redis ``QoS.restore_unacked`` hands the messages this worker holds unacknowledged back to their
  queues through the channel's connection; once Celery has collected that connection (which it does on
  a connection error) the transport has no client any more, and the restore dies with
  ``AttributeError: 'NoneType' object has no attribute 'hostname'``, taking the worker down with it.
  :func:`guard_restore_unacked` turns that into a logged error: the messages stay in Redis' unacked set
  (put back by Redis' visibility timeout), their jobs and deliveries come back sooner from the database
  (the heartbeat rule, due times), and Celery goes on reconnecting.
- Celery ends a worker whose reconnection attempts ran out like a worker that was asked to stop: exit
  status 0 and our heartbeat's clean-stop mark, so the reconciler saw it as stopped, not lost, and a
  supervisor with ``Restart=on-failure`` left it down. :data:`stopping_on_purpose` is set only by a
  stop signal; without it the worker leaves its row unmarked and exits non-zero (``python -m worker``).
"""

from __future__ import annotations

import functools
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

# Set when the worker got a stop signal (SIGTERM, SIGINT, SIGQUIT): anything else that ends it is a loss.
stopping_on_purpose = threading.Event()
# Exit status of a worker that ended without being asked to (EX_TEMPFAIL: try again later).
EXIT_LOST = 75


def guard_restore_unacked() -> None:
    """Wrap kombu's Redis ``QoS.restore_unacked`` once (idempotent) so a closed connection cannot crash it."""
    from kombu.transport import redis as kombu_redis

    original: Callable[..., Any] = kombu_redis.QoS.restore_unacked
    if getattr(original, "_cxr_guarded", False):
        return

    @functools.wraps(original)
    def restore_unacked(self: Any, client: Any = None) -> Any:
        try:
            return original(self, client)
        except AttributeError:
            transport = getattr(self.channel, "connection", None)
            if client is not None or (transport is not None and transport.client is not None):
                raise  # not the closed-connection failure: a real bug, let it show
            held = len(self._delivered)
            self._delivered.clear()
            log.error(
                "broker connection gone before %d unacknowledged message(s) could be handed back; "
                "Redis returns them after its visibility timeout, the reconciler sooner",
                held,
            )
            return None

    restore_unacked._cxr_guarded = True  # type: ignore[attr-defined]
    setattr(kombu_redis.QoS, "restore_unacked", restore_unacked)  # noqa: B010
