"""The task-name contract between the listener/dashboard (which enqueue) and the worker (which runs).

The service never imports the worker: it sends these names with ``send_task``, passing ids only.
"""

from __future__ import annotations

from typing import Final

PROCESS_STUDY: Final = "cxr.process_study"
DELIVER: Final = "cxr.deliver"

INFERENCE_QUEUE: Final = "inference"
DELIVERY_QUEUE: Final = "delivery"

TASK_QUEUES: Final = {PROCESS_STUDY: INFERENCE_QUEUE, DELIVER: DELIVERY_QUEUE}
