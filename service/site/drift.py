"""Drift: this site's weekly distributions of the model's scores per finding and of its inputs, against
the bundle's training reference (``docs/reference_distribution.json``, written by
``monai_train.drift_reference``), with a population stability index (PSI) per item.

Items: ``score:<finding>`` (binned on the reference's edges), ``view``, ``manufacturer``, ``modality``,
``photometric``, ``gate`` (categories), ``pixel_spacing_mm`` and ``image_size`` (binned on the reference's
edges). An item the reference lacks (a PNG training set has no manufacturer) is shown without a PSI.

PSI = Σ (aᵢ − eᵢ) · ln(aᵢ / eᵢ) over bins, a the week's fractions and e the reference's, each floored at
:data:`FLOOR` so an empty bin counts as rare, not impossible. Common reading: < 0.1 stable, 0.1–0.2 watch,
> 0.2 (CXR_DRIFT_PSI_WARN) a shift worth a look.
"""

from __future__ import annotations

import itertools
import json
import math
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from service.core.models import Job
from service.core.settings import Settings
from service.core.status import JobStatus
from service.site.bundles import live_path

REFERENCE = Path("docs/reference_distribution.json")
FLOOR = 1e-4
CATEGORICAL = ("view", "manufacturer", "modality", "photometric", "gate")
NUMERIC = ("pixel_spacing_mm", "image_size")
ACCEPTED = "accepted"  # the gate's category for an instance it let through
MISSING = "(none)"


def psi(expected: Sequence[float], actual: Sequence[float], floor: float = FLOOR) -> float:
    """Population stability index of two distributions over the same bins (fractions, each summing
    to 1; a bin under ``floor`` counts as ``floor``)."""
    if len(expected) != len(actual):
        raise ValueError("the two distributions need the same bins")
    total = 0.0
    for e, a in zip(expected, actual, strict=True):
        e, a = max(e, floor), max(a, floor)
        total += (a - e) * math.log(a / e)
    return total


def bin_fractions(values: Sequence[float], edges: Sequence[float]) -> list[float]:
    """Fractions of ``values`` in the bins between ``edges`` (first and last bins open-ended)."""
    counts = [0] * (len(edges) - 1)
    for v in values:
        i = sum(1 for edge in edges[1:-1] if v >= edge)
        counts[i] += 1
    n = len(values)
    return [c / n for c in counts] if n else [0.0] * len(counts)


def category_fractions(values: Iterable[str]) -> dict[str, float]:
    counts = Counter(values)
    n = sum(counts.values())
    return {k: v / n for k, v in sorted(counts.items())} if n else {}


@dataclass(frozen=True)
class Reference:
    """The bundle's training reference: bin edges and fractions (numeric), fractions (categorical)."""

    source: str
    binned: dict[str, tuple[list[float], list[float]]]  # item → (edges, fractions)
    categories: dict[str, dict[str, float]]

    @classmethod
    def load(cls, bundle_dir: Path) -> Reference | None:
        try:
            raw = json.loads((bundle_dir / REFERENCE).read_text())
        except (OSError, ValueError):
            return None
        binned = {}
        for label, spec in (raw.get("scores") or {}).items():
            binned[f"score:{label}"] = (
                [float(x) for x in spec["edges"]],
                [float(x) for x in spec["fractions"]],
            )
        categories = {}
        for item, spec in (raw.get("inputs") or {}).items():
            if isinstance(spec, dict) and "edges" in spec:
                binned[item] = ([float(x) for x in spec["edges"]], [float(x) for x in spec["fractions"]])
            elif isinstance(spec, dict):
                categories[item] = {str(k): float(v) for k, v in spec.items()}
        return cls(str(raw.get("source", "")), binned, categories)


@dataclass
class Week:
    """One week's observations: per item, the values (numeric) or categories seen."""

    start: datetime
    jobs: int = 0
    numeric: dict[str, list[float]] = field(default_factory=dict)
    categorical: dict[str, list[str]] = field(default_factory=dict)

    def add_result(self, result: Mapping[str, Any]) -> None:
        self.jobs += 1
        for reason in (result.get("gate") or {}).values():
            self.categorical.setdefault("gate", []).append(str(reason) if reason else ACCEPTED)
        for image in result.get("images") or []:
            if not isinstance(image, dict):
                continue
            for label, score in (image.get("probabilities") or {}).items():
                self.numeric.setdefault(f"score:{label}", []).append(float(score))
            if image.get("rows") and image.get("columns"):
                self.numeric.setdefault("image_size", []).append(float(max(image["rows"], image["columns"])))
            inputs = image.get("inputs") or {}
            if inputs.get("pixel_spacing_mm") is not None:
                self.numeric.setdefault("pixel_spacing_mm", []).append(float(inputs["pixel_spacing_mm"]))
            for item in ("view", "manufacturer", "modality", "photometric"):
                if "inputs" in image:
                    self.categorical.setdefault(item, []).append(str(inputs.get(item) or MISSING))


@dataclass(frozen=True)
class ItemDrift:
    item: str
    psi: float | None  # None: no reference for it, or nothing seen this week
    observed: dict[str, float]  # bin label or category → fraction this week
    reference: dict[str, float]
    n: int
    warn: bool


@dataclass(frozen=True)
class WeekDrift:
    start: datetime
    jobs: int
    items: list[ItemDrift]


def _bin_labels(edges: Sequence[float]) -> list[str]:
    return [f"{a:.3g}–{b:.3g}" for a, b in itertools.pairwise(edges)]


def compare(week: Week, ref: Reference | None, warn_at: float) -> WeekDrift:
    items: list[ItemDrift] = []
    names = sorted(set(week.numeric) | set(ref.binned if ref else ()) | {"image_size", "pixel_spacing_mm"})
    for item in names:
        values = week.numeric.get(item, [])
        spec = ref.binned.get(item) if ref else None
        if spec is None:
            items.append(ItemDrift(item, None, {}, {}, len(values), False))
            continue
        edges, expected = spec
        actual = bin_fractions(values, edges)
        value = psi(expected, actual) if values else None
        labels = _bin_labels(edges)
        items.append(
            ItemDrift(
                item,
                value,
                dict(zip(labels, actual, strict=True)),
                dict(zip(labels, expected, strict=True)),
                len(values),
                value is not None and value > warn_at,
            )
        )
    for item in CATEGORICAL:
        seen = week.categorical.get(item, [])
        observed = category_fractions(seen)
        expected_map = ref.categories.get(item) if ref else None
        if not expected_map or not seen:
            items.append(ItemDrift(item, None, observed, expected_map or {}, len(seen), False))
            continue
        keys = sorted(set(observed) | set(expected_map))
        value = psi([expected_map.get(k, 0.0) for k in keys], [observed.get(k, 0.0) for k in keys])
        items.append(ItemDrift(item, value, observed, expected_map, len(seen), value > warn_at))
    return WeekDrift(week.start, week.jobs, items)


def week_start(at: datetime) -> datetime:
    """Monday 00:00 UTC of ``at``'s week."""
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    return day - timedelta(days=day.weekday())


def weeks(session: Session, now: datetime, count: int) -> list[Week]:
    """The last ``count`` weeks of finished jobs (done or skipped: a skipped job's gate reasons count)."""
    first = week_start(now) - timedelta(weeks=count - 1)
    out = {first + timedelta(weeks=i): Week(first + timedelta(weeks=i)) for i in range(count)}
    stmt = (
        select(Job.finished_at, Job.result)
        .where(Job.status.in_([JobStatus.DONE, JobStatus.SKIPPED]), Job.finished_at >= first)
        .order_by(Job.finished_at)
    )
    for finished_at, result in session.execute(stmt):
        week = out.get(week_start(finished_at)) if finished_at is not None else None
        if week is not None and isinstance(result, dict):
            week.add_result(result)
    return list(out.values())


def drift(session: Session, bundle_dir: Path, now: datetime, count: int, warn_at: float) -> list[WeekDrift]:
    ref = Reference.load(bundle_dir)
    return [compare(w, ref, warn_at) for w in weeks(session, now, count)]


def latest_psi(report: Sequence[WeekDrift]) -> dict[str, float]:
    """Each item's PSI in the latest week that has one (the gauges' values)."""
    out: dict[str, float] = {}
    for week in report:
        for item in week.items:
            if item.psi is not None:
                out[item.item] = item.psi
    return out


class DriftCollector:
    """Prometheus ``cxr_drift_psi{item}``: each item's PSI in the latest week that has one, against the
    live bundle's reference (computed per scrape from the drift_weeks window)."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions

    def collect(self) -> Iterator[GaugeMetricFamily]:
        gauge = GaugeMetricFamily(
            "cxr_drift_psi",
            "Population stability index of a drift item (latest week) against the bundle's reference",
            labels=["item"],
        )
        with self.sessions() as session:
            bundle_dir = live_path(session, self.settings.model_bundle)
            s = self.settings
            report = drift(session, bundle_dir, datetime.now(UTC), s.drift_weeks, s.drift_psi_warn)
        for item, value in sorted(latest_psi(report).items()):
            gauge.add_metric([item], value)
        yield gauge

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
