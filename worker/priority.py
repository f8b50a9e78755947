"""The worklist priority of one analysed image: the most urgent of the urgency rules that fire on it,
by the notifications' own rule evaluation (service.notify.rules.evaluate), so the SR and the
notifications never disagree."""

from __future__ import annotations

from typing import Any

from pydicom import dcmread

from service.core.status import OutputKind
from service.notify.config import NotifyRule, Priority
from service.notify.rules import evaluate
from worker.dicom.priority import add_priority
from worker.outputs import Output, write

_ORDER = [Priority.STAT, Priority.ASAP, Priority.ROUTINE]


def image_priority(rules: list[NotifyRule], image: dict[str, Any], bundle: dict[str, Any]) -> str | None:
    """``image``: the image's entry of the job result; None when no rule fires."""
    fired = {hit.rule.priority for hit in evaluate(rules, {"images": [image], "bundle": bundle})}
    return next((p.value for p in _ORDER if p in fired), None)


def mark_priority(outputs: list[Output], priority: str | None) -> None:
    """Add the priority hint to the image's findings SR (worker.dicom.priority), rewritten in place.

    Done on the written file so that the SR builders know nothing of notification rules.
    """
    if priority is None:
        return
    for out in outputs:
        if out.kind == OutputKind.SR:
            write(add_priority(dcmread(out.path), priority), out.path)
