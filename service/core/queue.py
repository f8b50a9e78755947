"""The Celery app as both sides see it: the service only ``send_task``s by name, the worker adds tasks."""

from __future__ import annotations

from typing import Any

from celery import Celery

from service.core import tasks
from service.core.settings import Settings


def make_celery(settings: Settings) -> Celery:
    app = Celery("cxr_gateway", broker=settings.effective_broker_url)
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
        }
    elif settings.effective_broker_url.startswith(("redis://", "rediss://")):
        # Longer than the longest a task can sit unacknowledged, so Redis does not redeliver it early.
        transport_options = {"visibility_timeout": 3600}
    app.conf.update(
        broker_transport_options=transport_options,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_default_queue=tasks.INFERENCE_QUEUE,
        task_routes={name: {"queue": queue} for name, queue in tasks.TASK_QUEUES.items()},
        worker_hijack_root_logger=False,
    )
    return app


def enqueue(app: Celery, task_name: str, *args: Any, countdown: float | None = None) -> None:
    """Send a task by name onto its queue; raises if the broker cannot take it."""
    app.send_task(
        task_name,
        args=list(args),
        queue=tasks.TASK_QUEUES[task_name],
        countdown=countdown,
        retry=True,
        retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
    )
