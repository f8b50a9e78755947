"""Local validation: the model's figures on the site's own labelled studies.

A labelled study is one whose latest analysed job (of a bundle version, in a period) has a reference:
imported labels (service.site.labels), or else the readers' verdicts (service.site.feedback.RULE). Its
score per finding is the highest over its analysed images; Present is score ≥ the finding's threshold.

Per finding: counts, AUROC with a 95 % interval from a bootstrap over patients (studies of one patient are
resampled together), sensitivity, specificity, PPV and NPV at the thresholds given with 95 % Wilson
intervals, and reliability bins (calibration). The operating-point tools reuse :func:`labelled_cases`,
:func:`finding_figures` and :func:`roc_curve` to pick thresholds on the same studies.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from numpy.typing import NDArray
from sqlalchemy import select
from sqlalchemy.orm import Session

from service.core.models import FindingFeedback, Job, Study
from service.core.status import JobStatus
from service.site.feedback import RULE, Verdict, truth
from service.site.findings import StudyCall, study_call
from service.site.labels import reference_labels

Z95 = 1.959963984540054
CALIBRATION_BINS = 10
BOOTSTRAP_RESAMPLES = 1000


@dataclass(frozen=True)
class StudyCase:
    """One labelled study: its patient (the bootstrap's unit), the model's call, and the truth per finding
    with where it came from ("reference" or "feedback")."""

    study_id: int
    job_id: str
    patient: str
    bundle_version: str | None
    call: StudyCall
    truth: dict[str, bool]
    source: dict[str, str]


def labelled_cases(
    session: Session,
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    bundle_version: str | None = None,
) -> list[StudyCase]:
    """The labelled studies whose latest analysed job (of ``bundle_version`` when given) was received in
    [since, until)."""
    stmt = (
        select(Job.id, Job.study_id, Job.result, Job.bundle_version, Study.patient_id)
        .join(Study, Study.id == Job.study_id)
        .where(Job.status == JobStatus.DONE)
        .order_by(Job.created_at, Job.id)
    )
    if since is not None:
        stmt = stmt.where(Job.received_at >= since)
    if until is not None:
        stmt = stmt.where(Job.received_at < until)
    if bundle_version is not None:
        stmt = stmt.where(Job.bundle_version == bundle_version)
    return study_cases(session, list(session.execute(stmt)))


def study_cases(session: Session, rows: Sequence[Any]) -> list[StudyCase]:
    """The labelled cases among result rows (``id`` the job, ``study_id``, ``result``,
    ``bundle_version``, ``patient_id``; oldest first): a live job's or a candidate bundle's shadow run's."""
    latest = {row.study_id: row for row in rows}  # later jobs replace earlier ones
    ids = list(latest)
    reference = reference_labels(session, ids)
    readers = _reader_truth(session, ids)
    cases = []
    for study_id, row in latest.items():
        call = study_call(row.result)
        if call is None:
            continue
        if study_id in reference:
            known, source = reference[study_id], "reference"
        else:
            known, source = readers.get(study_id, {}), "feedback"
        known = {f: t for f, t in known.items() if f in call.scores}
        if known:
            patient = row.patient_id or f"study:{study_id}"
            cases.append(
                StudyCase(
                    study_id, row.id, patient, row.bundle_version, call, known, dict.fromkeys(known, source)
                )
            )
    return cases


def _reader_truth(session: Session, study_ids: list[int]) -> dict[int, dict[str, bool]]:
    """Study → finding → truth from the latest verdict that gives one (unsure verdicts give none)."""
    out: dict[int, dict[str, bool]] = {}
    for chunk in range(0, len(study_ids), 500):
        rows = session.execute(
            select(
                FindingFeedback.study_id,
                FindingFeedback.finding,
                FindingFeedback.verdict,
                FindingFeedback.model_present,
            )
            .where(
                FindingFeedback.study_id.in_(study_ids[chunk : chunk + 500]),
                FindingFeedback.verdict != Verdict.UNSURE,
            )
            .order_by(FindingFeedback.updated_at, FindingFeedback.id)
        )
        for row in rows:
            value = truth(row.verdict, row.model_present)
            if value is not None:
                out.setdefault(row.study_id, {})[row.finding] = value
    return out


# ------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Proportion:
    value: float | None
    low: float | None
    high: float | None
    k: int
    n: int


def wilson(k: int, n: int, z: float = Z95) -> Proportion:
    """k of n with its Wilson score interval (sound at 0 and n, unlike the normal approximation)."""
    if n == 0:
        return Proportion(None, None, None, k, n)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At 0 and n the bounds are exactly 0 and 1; the formula leaves rounding dust there.
    low = 0.0 if k == 0 else max(0.0, centre - half)
    high = 1.0 if k == n else min(1.0, centre + half)
    return Proportion(p, low, high, k, n)


def auroc(y: NDArray[np.bool_], s: NDArray[np.float64]) -> float | None:
    """The area under the ROC curve (Mann–Whitney U with mid-ranks for ties); None with one class."""
    pos = int(y.sum())
    neg = len(y) - pos
    if pos == 0 or neg == 0:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # The mid-rank (1-based) of each distinct score, shared by all its ties.
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[inverse]
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def roc_curve(y: NDArray[np.bool_], s: NDArray[np.float64]) -> list[tuple[float, float, float]]:
    """(threshold, sensitivity, 1 − specificity) at every distinct score, highest threshold first,
    Present being score ≥ threshold; starts at (inf, 0, 0)."""
    pos, neg = int(y.sum()), int((~y).sum())
    points = [(math.inf, 0.0, 0.0)]
    for t in np.unique(s)[::-1]:
        called = s >= t
        tpr = float((called & y).sum() / pos) if pos else 0.0
        fpr = float((called & ~y).sum() / neg) if neg else 0.0
        points.append((float(t), tpr, fpr))
    return points


def bootstrap_auroc(
    y: NDArray[np.bool_],
    s: NDArray[np.float64],
    groups: Sequence[str],
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> tuple[float | None, float | None]:
    """Percentile 95 % interval of the AUROC, resampling whole patients with replacement."""
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    clusters = [np.asarray(v) for v in members.values()]
    if len(clusters) < 2 or auroc(y, s) is None:
        return None, None
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(resamples):
        picked = np.concatenate([clusters[i] for i in rng.integers(0, len(clusters), len(clusters))])
        value = auroc(y[picked], s[picked])
        if value is not None:  # a resample with one class has no AUROC
            values.append(value)
    if len(values) < resamples // 2:
        return None, None
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


@dataclass(frozen=True)
class CalibrationBin:
    low: float
    high: float
    count: int
    mean_score: float | None
    observed: Proportion


def calibration(
    y: NDArray[np.bool_], s: NDArray[np.float64], bins: int = CALIBRATION_BINS
) -> list[CalibrationBin]:
    """Reliability bins of equal width on [0, 1]: mean score against the fraction truly present."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, s, side="right") - 1, 0, bins - 1)
    out = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        mean = float(s[inside].mean()) if n else None
        out.append(
            CalibrationBin(float(edges[b]), float(edges[b + 1]), n, mean, wilson(int(y[inside].sum()), n))
        )
    return out


@dataclass(frozen=True)
class FindingFigures:
    finding: str
    threshold: float | None
    studies: int
    positives: int
    negatives: int
    from_reference: int
    from_feedback: int
    auroc: float | None
    auroc_low: float | None
    auroc_high: float | None
    sensitivity: Proportion
    specificity: Proportion
    ppv: Proportion
    npv: Proportion
    calibration: list[CalibrationBin]
    roc: list[tuple[float, float, float]] = field(repr=False)


def finding_figures(
    finding: str,
    cases: Sequence[StudyCase],
    threshold: float | None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> FindingFigures:
    """One finding's figures on the cases that have a truth for it (no threshold: no Present/Absent)."""
    mine = [c for c in cases if finding in c.truth]
    y = np.asarray([c.truth[finding] for c in mine], dtype=bool)
    s = np.asarray([c.call.scores[finding] for c in mine], dtype=np.float64)
    groups = [c.patient for c in mine]
    called = s >= threshold if threshold is not None else np.zeros(len(s), dtype=bool)
    tp, fp = int((called & y).sum()), int((called & ~y).sum())
    fn, tn = int((~called & y).sum()), int((~called & ~y).sum())
    none = wilson(0, 0)
    low, high = bootstrap_auroc(y, s, groups, resamples=resamples, seed=seed)
    return FindingFigures(
        finding=finding,
        threshold=threshold,
        studies=len(mine),
        positives=int(y.sum()),
        negatives=int((~y).sum()),
        from_reference=sum(1 for c in mine if c.source[finding] == "reference"),
        from_feedback=sum(1 for c in mine if c.source[finding] == "feedback"),
        auroc=auroc(y, s),
        auroc_low=low,
        auroc_high=high,
        sensitivity=wilson(tp, tp + fn) if threshold is not None else none,
        specificity=wilson(tn, tn + fp) if threshold is not None else none,
        ppv=wilson(tp, tp + fp) if threshold is not None else none,
        npv=wilson(tn, tn + fn) if threshold is not None else none,
        calibration=calibration(y, s),
        roc=roc_curve(y, s),
    )


@dataclass(frozen=True)
class ValidationReport:
    since: datetime | None
    until: datetime | None
    bundle_version: str | None
    bundle_versions: list[str]
    studies: int
    patients: int
    rule: str
    findings: list[FindingFigures]
    resamples: int

    def as_json(self) -> dict[str, Any]:
        data = asdict(self)
        for f in data["findings"]:
            f.pop("roc")  # a curve per distinct score: the chart's, not the API's
        data["since"] = self.since.isoformat() if self.since else None
        data["until"] = self.until.isoformat() if self.until else None
        data["notice"] = "AI-generated results, not for diagnostic use."
        return data


def validate(
    session: Session,
    labels: Sequence[str],
    thresholds: Mapping[str, float],
    *,
    since: datetime | None = None,
    until: datetime | None = None,
    bundle_version: str | None = None,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = 0,
) -> ValidationReport:
    """Figures for each of ``labels`` (the model's findings, in its order) at ``thresholds``."""
    cases = labelled_cases(session, since=since, until=until, bundle_version=bundle_version)
    figures = [finding_figures(f, cases, thresholds.get(f), resamples=resamples, seed=seed) for f in labels]
    return ValidationReport(
        since=since,
        until=until,
        bundle_version=bundle_version,
        bundle_versions=sorted({c.bundle_version for c in cases if c.bundle_version}),
        studies=len(cases),
        patients=len({c.patient for c in cases}),
        rule=RULE,
        findings=figures,
        resamples=resamples,
    )
