"""The Celery app as both sides see it: the service only ``send_task``s by name, the worker adds tasks;
and the hand-over of a queued job to the workers (:func:`send_queued`)."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import urlsplit

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from service.core import task_names
from service.core.jobs import transition
from service.core.settings import Settings
from service.core.status import JobStatus

log = logging.getLogger(__name__)

# kombu's Redis transport keeps each priority level in its own list: "<queue>\x06\x16<priority>".
_REDIS_PRIORITY_SUFFIXES = ("", "\x06\x163", "\x06\x166", "\x06\x169")
QUEUES = (task_names.INFERENCE_QUEUE, task_names.DELIVERY_QUEUE)


def make_celery(settings: Settings) -> Celery:
    app = Celery("cxr_gateway", broker=_broker_url(settings))
    transport_options: dict[str, Any] = {}
    if settings.effective_broker_url.startswith("filesystem://"):
        # Embedded single-machine broker: messages are files under the data dir.
        folder = settings.broker_dir / "messages"
        processed = settings.broker_dir / "processed"
        control = settings.broker_dir / "control"
        for path in (folder, processed, control):
            path.mkdir(parents=True, exist_ok=True)
        transport_options = {
            "data_folder_in": str(folder),
            "data_folder_out": str(folder),
            "processed_folder": str(processed),
            "store_processed": False,
            "control_folder": str(control),
            # kombu's default is 1 s, and a study crosses the broker at least once.
            "polling_interval": settings.broker_poll_seconds,
        }
    elif settings.effective_broker_url.startswith(("redis://", "rediss://")):
        # Longer than the longest a task can sit unacknowledged, so Redis does not redeliver it early.
        transport_options = {"visibility_timeout": 3600}
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=settings.worker_broker_max_retries,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=task_names.INFERENCE_QUEUE,
        task_routes={name: {"queue": queue} for name, queue in task_names.TASK_QUEUES.items()},
        worker_hijack_root_logger=False,
    )
    return app


def _broker_url(settings: Settings) -> str:
    url = settings.effective_broker_url
    # The filesystem transport ignores the host, but kombu warns "No hostname was supplied" at every
    # connection when a URL has none (the default "filesystem://"): name the only host it can be.
    if url.startswith("filesystem://") and not urlsplit(url).hostname:
        return "filesystem://localhost/" + url.removeprefix("filesystem://").lstrip("/")
    return url


def enqueue(app: Celery, task_name: str, *args: Any) -> None:
    """Send a task by name onto its queue, to run now; raises if the broker cannot take it.

    Never a countdown or ETA: a delayed task waits unacknowledged in one worker's memory (with Redis, for
    the visibility timeout once that worker dies). Later work has a due time in the database instead.
    """
    app.send_task(
        task_name,
        args=list(args),
        queue=task_names.TASK_QUEUES[task_name],
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )


def send_queued(sessions: sessionmaker[Session], celery: Celery, job_id: str) -> Exception | None:
    """Send a job already marked 'queued' to the workers; None once the broker has its message.

    Marked first, then sent: a worker that starts at once must find 'queued', never have its 'running'
    overwritten. When the broker refuses, the job goes back to 'received' (the listener's assembler
    queues it again once the broker is back) and the broker's error is returned.
    """
    try:
        enqueue(celery, task_names.PROCESS_STUDY, job_id)
    except Exception as exc:
        with sessions.begin() as session:
            transition(session, job_id, JobStatus.RECEIVED, expected=[JobStatus.QUEUED])
        return exc
    return None


def broker_kind(settings: Settings) -> str:
    return settings.effective_broker_url.split("://", 1)[0] or "unknown"


def queue_depth(celery: Celery, settings: Settings) -> dict[str, int | None]:
    """Messages waiting per queue: files for the filesystem broker, LLEN for Redis; None if unknown."""
    kind = broker_kind(settings)
    depth: dict[str, int | None] = dict.fromkeys(QUEUES)
    try:
        if kind == "filesystem":
            folder = settings.broker_dir / "messages"
            names = [p.name for p in folder.iterdir()] if folder.is_dir() else []
            for queue in QUEUES:
                depth[queue] = sum(1 for n in names if n.endswith(f".{queue}.msg"))
        elif kind in {"redis", "rediss"}:
            with celery.connection_for_read() as conn:
                conn.ensure_connection(max_retries=1, timeout=2.0)
                client = conn.default_channel.client
                for queue in QUEUES:
                    depth[queue] = sum(int(client.llen(queue + s)) for s in _REDIS_PRIORITY_SUFFIXES)
    except Exception as exc:
        log.warning("queue depth unavailable (%s)", type(exc).__name__)
    return depth
