"""The model's findings as the site loop reads them: the bundle's labels and operating points, finding
names as people write them, and one job's study-level call from its stored result."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

NO_FINDING = "No Finding"


@dataclass(frozen=True)
class ModelFindings:
    """The findings a bundle reports, in its order, and the thresholds it ships."""

    labels: tuple[str, ...]
    operating_points: dict[str, float]
    version: str | None = None

    def resolve(self, name: str) -> str | None:
        """The label ``name`` means ("pleural thickening" → "Pleural_Thickening"), or None."""
        return {canonical(label): label for label in self.labels}.get(canonical(name))


def canonical(name: str) -> str:
    # RIS exports and NIH's CSV differ in case and in spaces versus underscores, never in the words.
    return re.sub(r"[\s_\-]+", "_", name.strip()).casefold()


def bundle_findings(bundle_dir: Path) -> ModelFindings:
    """The bundle's labels and operating points from configs/metadata.json (the service never loads the
    model); empty when the file is missing or unreadable."""
    try:
        meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    except (OSError, ValueError):
        return ModelFindings((), {})
    if not isinstance(meta, dict):
        return ModelFindings((), {})
    labels = tuple(str(x) for x in meta.get("labels") or [])
    raw = meta.get("operating_points")
    points = {str(k): float(v) for k, v in raw.items()} if isinstance(raw, dict) else {}
    version = meta.get("version")
    return ModelFindings(labels, points, None if version is None else str(version))


@dataclass(frozen=True)
class StudyCall:
    """A job's study-level output: each finding's highest score over the analysed images, and the
    findings the job called present on any image (at the operating points it ran with)."""

    scores: dict[str, float]
    present: frozenset[str] = field(default_factory=frozenset)

    def present_at(self, thresholds: Mapping[str, float]) -> frozenset[str]:
        """The findings present at other thresholds (score ≥ threshold, as the worker decides)."""
        return frozenset(f for f, s in self.scores.items() if f in thresholds and s >= thresholds[f])


def study_call(result: Mapping[str, Any] | None) -> StudyCall | None:
    """None when the result has no analysed image (a not-analysed study cannot be validated)."""
    images = (result or {}).get("images")
    scores: dict[str, float] = {}
    present: set[str] = set()
    for image in images if isinstance(images, list) else []:
        if not isinstance(image, dict) or not isinstance(image.get("probabilities"), dict):
            continue
        for label, value in image["probabilities"].items():
            if isinstance(value, int | float) and not isinstance(value, bool):
                scores[str(label)] = max(float(value), scores.get(str(label), float("-inf")))
        present.update(str(x) for x in _strings(image.get("present")))
    return StudyCall(scores, frozenset(present)) if scores else None


def _strings(value: Any) -> Iterable[str]:
    return [x for x in value if isinstance(x, str)] if isinstance(value, list) else []
