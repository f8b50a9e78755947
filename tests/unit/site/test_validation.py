"""Local validation on a seeded site: every figure against scikit-learn on the same studies, the truth
taken from imported labels or, where a study has none, from the readers' verdicts."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from sklearn.calibration import calibration_curve
from sklearn.metrics import confusion_matrix, roc_auc_score
from sqlalchemy.orm import Session, sessionmaker

from service.core.models import Job
from service.site import feedback, labels
from service.site.feedback import Verdict
from service.site.findings import ModelFindings
from service.site.validation import auroc, bootstrap_auroc, labelled_cases, validate, wilson
from tests.unit.admin.conftest import T0
from tests.unit.site.conftest import seed_job


def test_wilson_interval_matches_the_published_value() -> None:
    # Wilson (1927) score interval for 8 of 10 at 95 %: 0.4902 to 0.9433 (Newcombe 1998, table I).
    p = wilson(8, 10)
    assert (
        p.value == 0.8
        and p.low == pytest.approx(0.4902, abs=1e-4)
        and p.high == pytest.approx(0.9433, abs=1e-4)
    )
    zero = wilson(0, 12)
    assert zero.value == 0.0 and zero.low == 0.0 and 0.2 < (zero.high or 0) < 0.3
    assert wilson(0, 0).value is None


def test_auroc_with_ties_matches_sklearn() -> None:
    rng = np.random.default_rng(3)
    y = rng.random(300) < 0.3
    s = np.round(rng.random(300) * 0.5 + y * 0.2, 2)  # many ties
    assert auroc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert auroc(np.ones(4, dtype=bool), s[:4]) is None


def test_bootstrap_resamples_whole_patients() -> None:
    rng = np.random.default_rng(5)
    y = rng.random(120) < 0.4
    s = rng.random(120) + y * 0.6
    groups = [f"p{i // 3}" for i in range(120)]
    low, high = bootstrap_auroc(y, s, groups, resamples=400, seed=1)
    point = auroc(y, s)
    assert low is not None and high is not None and point is not None
    assert low < point < high and high - low < 0.25
    assert bootstrap_auroc(y, s, groups, resamples=400, seed=1) == (low, high)  # seeded: reproducible
    assert bootstrap_auroc(y, s, ["one"] * 120) == (None, None)  # one patient: no interval


def _seed_site(sessions: sessionmaker[Session], model: ModelFindings) -> dict[int, dict[str, bool]]:
    """60 analysed studies of 40 patients; 45 labelled by a CSV import (some by accession number), 10 by
    reader verdicts, 5 unlabelled. Returns the truth the test expects, by study index."""
    rng = np.random.default_rng(11)
    points = model.operating_points
    expected: dict[int, dict[str, bool]] = {}
    csv_lines = ["StudyInstanceUID,AccessionNumber,Findings"]
    jobs = []
    for i in range(60):
        truth = {f: bool(rng.random() < 0.35) for f in model.labels}
        scores = {
            f: float(np.clip(rng.normal(0.45 if truth[f] else 0.2, 0.18), 0.0005, 0.9995))
            for f in model.labels
        }
        job_id, uid = seed_job(
            sessions,
            scores,
            points,
            patient_id=f"PID-{i % 40}",
            accession=f"ACC-{i}",
            received=T0 + timedelta(hours=i),
        )
        jobs.append(job_id)
        present = [f for f in model.labels if truth[f]]
        cell = "|".join(f.replace("_", " ").lower() for f in present) or "No Finding"
        if i < 45:
            csv_lines.append(f"{uid},,{cell}" if i % 3 else f",ACC-{i},{cell}")
            expected[i] = truth
        elif i < 55:
            # Reader verdicts on four findings; an unsure one gives no truth, a later verdict replaces one.
            with sessions.begin() as s:
                job = s.get(Job, job_id)
                assert job is not None
                said = {f: scores[f] >= points[f] for f in model.labels}
                chosen = list(model.labels[:4])
                expected[i] = {}
                for f in chosen[:3]:
                    verdict = (
                        Verdict.AGREE
                        if said[f] == truth[f]
                        else (Verdict.MISSED if truth[f] else Verdict.DISAGREE)
                    )
                    feedback.record(
                        s, job, f, Verdict.DISAGREE if verdict == Verdict.AGREE else Verdict.AGREE, "early"
                    )
                    feedback.record(s, job, f, verdict, "rita")
                    expected[i][f] = truth[f]
                feedback.record(s, job, chosen[3], Verdict.UNSURE, "rita")
    with sessions.begin() as s:
        labels.import_labels(s, "\n".join(csv_lines).encode(), model, username="alice", filename="ris.csv")
    return expected


def test_validation_matches_sklearn_on_a_seeded_site(
    sessions: sessionmaker[Session], model: ModelFindings
) -> None:
    expected = _seed_site(sessions, model)
    points = model.operating_points
    with sessions() as s:
        report = validate(s, model.labels, points, resamples=200)
    assert report.studies == 55 and report.patients == 40
    # The scores as stored, per study in seeding order (study ids grow with it).
    with sessions() as s:
        by_study = {c.study_id: c for c in labelled_cases(s)}
    ordered = [by_study[k] for k in sorted(by_study)]
    assert len(ordered) == 55
    for fig in report.findings:
        f = fig.finding
        idx = [i for i in range(55) if f in expected[i]]
        y = np.array([expected[i][f] for i in idx])
        s_ = np.array([ordered[i].call.scores[f] for i in idx])
        assert fig.studies == len(idx) and fig.positives == int(y.sum())
        assert fig.from_feedback == sum(1 for i in idx if i >= 45)
        assert fig.auroc == pytest.approx(roc_auc_score(y, s_), abs=1e-12)
        tn, fp, fn, tp = confusion_matrix(y, s_ >= points[f], labels=[False, True]).ravel()
        assert (fig.sensitivity.k, fig.sensitivity.n) == (tp, tp + fn)
        assert (fig.specificity.k, fig.specificity.n) == (tn, tn + fp)
        assert (fig.ppv.k, fig.ppv.n) == (tp, tp + fp)
        assert (fig.npv.k, fig.npv.n) == (tn, tn + fn)
        if tp + fn:
            assert fig.sensitivity.value == pytest.approx(tp / (tp + fn))
        prob_true, prob_pred = calibration_curve(y, s_, n_bins=10, strategy="uniform")
        filled = [b for b in fig.calibration if b.count]
        assert [b.observed.value for b in filled] == pytest.approx(list(prob_true))
        assert [b.mean_score for b in filled] == pytest.approx(list(prob_pred))
        assert fig.auroc_low is not None and fig.auroc_high is not None
        assert fig.auroc_low <= fig.auroc <= fig.auroc_high
    data = report.as_json()
    assert data["findings"][0]["sensitivity"]["k"] == report.findings[0].sensitivity.k
    assert "not for diagnostic use" in data["notice"]


def test_validation_filters_by_bundle_version_and_period(
    sessions: sessionmaker[Session], model: ModelFindings
) -> None:
    points = model.operating_points
    uids = []
    for n, version in enumerate(["v1", "v1", "v2"]):
        scores = {f: 0.5 if n % 2 else 0.01 for f in model.labels}
        uids.append(seed_job(sessions, scores, points, version=version, received=T0 + timedelta(days=n))[1])
    csv = "StudyInstanceUID,Findings\n" + "\n".join(f"{u},Effusion" for u in uids)
    with sessions.begin() as s:
        labels.import_labels(s, csv.encode(), model, username="alice", filename=None)
    with sessions() as s:
        assert validate(s, model.labels, points, resamples=10).studies == 3
        assert validate(s, model.labels, points, bundle_version="v1", resamples=10).studies == 2
        assert validate(s, model.labels, points, since=T0 + timedelta(days=1), resamples=10).studies == 2
        only = validate(s, model.labels, points, until=T0 + timedelta(hours=1), resamples=10)
    assert only.studies == 1 and only.bundle_versions == ["v1"]
