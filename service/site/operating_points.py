"""Site operating points: the thresholds a site sets on its own studies, versioned per bundle version.

Every change is a new ``operating_point_sets`` row (who, when, why, the thresholds the site set; the
others stay the bundle's): a threshold set by value or chosen from the labelled studies (the highest
threshold giving a wanted sensitivity, or the lowest giving a wanted specificity), a revert to an earlier
version, or a revert to the bundle's defaults (an empty set). The worker reads the newest row of the
bundle version it runs (:func:`effective`) at job time and records the version in each output.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import OperatingPointSet
from service.site.bundles import live_findings
from service.site.findings import ModelFindings
from service.site.validation import StudyCase, roc_curve


class OperatingPointError(ValueError):
    """A threshold that cannot be set: unknown finding, out of [0, 1], no labelled study reaches it."""


class Target(StrEnum):
    SENSITIVITY = "sensitivity"
    SPECIFICITY = "specificity"


@dataclass(frozen=True)
class Effective:
    """The thresholds a job runs with: the bundle's, overlaid with the site's active set (if any)."""

    thresholds: dict[str, float]
    version: int | None  # the site set's id; None: the bundle's defaults
    site: dict[str, float]  # the findings the site set itself

    def as_json(self) -> dict[str, object]:
        return {
            "source": "site" if self.version is not None and self.site else "bundle",
            "version": self.version,
            "thresholds": {k: round(v, 6) for k, v in self.thresholds.items()},
            "site": sorted(self.site),
        }


def active(session: Session, bundle_version: str) -> OperatingPointSet | None:
    return session.scalars(
        select(OperatingPointSet)
        .where(OperatingPointSet.bundle_version == bundle_version)
        .order_by(OperatingPointSet.id.desc())
        .limit(1)
    ).first()


def history(session: Session, bundle_version: str) -> list[OperatingPointSet]:
    return list(
        session.scalars(
            select(OperatingPointSet)
            .where(OperatingPointSet.bundle_version == bundle_version)
            .order_by(OperatingPointSet.id.desc())
        )
    )


def effective(session: Session, bundle_version: str, defaults: Mapping[str, float]) -> Effective:
    row = active(session, bundle_version)
    site = {k: float(v) for k, v in (row.thresholds if row else {}).items() if k in defaults}
    return Effective({**defaults, **site}, row.id if row else None, site)


def _check(labels: Sequence[str], thresholds: Mapping[str, float]) -> dict[str, float]:
    out = {}
    for finding, value in thresholds.items():
        if finding not in labels:
            raise OperatingPointError(f"unknown finding {finding!r}")
        if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value <= 1.0):
            raise OperatingPointError(f"{finding}: a threshold lies in [0, 1]")
        out[finding] = float(value)
    return out


def set_thresholds(
    session: Session,
    bundle_version: str,
    labels: Sequence[str],
    thresholds: Mapping[str, float],
    *,
    reason: str,
    username: str,
) -> OperatingPointSet:
    """A new version: the active set with ``thresholds`` changed (the caller commits and audits)."""
    checked = _check(labels, thresholds)
    current = active(session, bundle_version)
    row = OperatingPointSet(
        bundle_version=bundle_version,
        thresholds={**(current.thresholds if current else {}), **checked},
        reason=reason[:500],
        username=username,
    )
    session.add(row)
    session.flush()
    return row


def revert(
    session: Session, bundle_version: str, to_version: int | None, *, username: str
) -> OperatingPointSet:
    """A new version equal to version ``to_version`` of this bundle version, or (None) to its defaults."""
    thresholds: dict[str, float] = {}
    if to_version is not None:
        earlier = session.get(OperatingPointSet, to_version)
        if earlier is None or earlier.bundle_version != bundle_version:
            raise OperatingPointError(f"no operating-point version {to_version} for bundle {bundle_version}")
        thresholds = dict(earlier.thresholds)
    row = OperatingPointSet(
        bundle_version=bundle_version,
        thresholds=thresholds,
        reason=f"revert to version {to_version}" if to_version is not None else "revert to the bundle's",
        username=username,
    )
    session.add(row)
    session.flush()
    return row


@dataclass(frozen=True)
class Choice:
    """A threshold chosen on the labelled studies, and what it gives there."""

    finding: str
    threshold: float
    sensitivity: float
    specificity: float
    studies: int

    @property
    def reason(self) -> str:
        return (
            f"{self.finding}: sensitivity {self.sensitivity:.3f}, specificity {self.specificity:.3f} "
            f"on {self.studies} labelled studies"
        )


def choose(cases: Sequence[StudyCase], finding: str, target: Target, value: float) -> Choice:
    """The threshold reaching ``target`` ≥ ``value`` on the studies with a truth for ``finding`` with the
    best of the other figure: for sensitivity the highest such threshold, for specificity the lowest."""
    if not 0.0 <= value <= 1.0:
        raise OperatingPointError("the target lies in [0, 1]")
    mine = [c for c in cases if finding in c.truth]
    y = np.asarray([c.truth[finding] for c in mine], dtype=bool)
    s = np.asarray([c.call.scores[finding] for c in mine], dtype=np.float64)
    if not y.any() or y.all():
        raise OperatingPointError(f"{finding}: the labelled studies need both present and absent cases")
    points = [p for p in roc_curve(y, s) if math.isfinite(p[0])]  # highest threshold first
    if target == Target.SENSITIVITY:
        hits = [p for p in points if p[1] >= value]
        best = hits[0] if hits else None
    else:
        hits = [p for p in points if 1.0 - p[2] >= value]
        best = hits[-1] if hits else None
    if best is None:
        raise OperatingPointError(f"{finding}: no threshold gives {target} ≥ {value:.2f}")
    return Choice(finding, best[0], best[1], 1.0 - best[2], len(mine))


def site_findings(session: Session, configured: Path) -> ModelFindings:
    """The live bundle's findings at the thresholds jobs run with now (the site's over the bundle's)."""
    model = live_findings(session, configured)
    if model.version is None:
        return model
    points = effective(session, model.version, model.operating_points)
    return ModelFindings(model.labels, points.thresholds, model.version)
