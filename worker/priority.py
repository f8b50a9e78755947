"""The worklist priority of one analysed image: the most urgent of the urgency rules that fire on it,
by the notifications' own rule evaluation (service.notify.rules.evaluate), so the SR and the
notifications never disagree. The findings SR builder carries it (worker.dicom.priority)."""

from __future__ import annotations

from typing import Any

from service.notify.config import NotifyRule, Priority
from service.notify.rules import evaluate

_ORDER = [Priority.STAT, Priority.ASAP, Priority.ROUTINE]


def image_priority(rules: list[NotifyRule], image: dict[str, Any], bundle: dict[str, Any]) -> str | None:
    """``image``: the image's entry of the job result; None when no rule fires."""
    fired = {hit.rule.priority for hit in evaluate(rules, {"images": [image], "bundle": bundle})}
    return next((p.value for p in _ORDER if p in fired), None)
