"""What the worker reads of the site loop at job time: the live bundle (switching when an admin promoted
another), the site's operating points for it, the candidate bundles to run in shadow beside it, and the
input attributes drift is measured on.

Candidates give scores and Present/Absent calls only, stored in ``job_results``: no output object is
built for them, so nothing of theirs can reach the PACS. A candidate that fails costs its own result, never
the job.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from pydicom import Dataset
from sqlalchemy import select

from service.core.models import BundleRecord, JobResult
from service.site import bundles, operating_points
from worker.inference.bundle import Bundle, load_bundle
from worker.inference.predictor import Predictor
from worker.runtime import Runtime

log = logging.getLogger(__name__)


def sync_live_bundle(rt: Runtime) -> None:
    """Serve the registry's live bundle from this job on (a promotion or roll-back since the last job)."""
    with rt.sessions() as session:
        row = bundles.live(session)
        path = Path(row.path) if row else None
    if path is not None and rt.use_bundle(path):
        log.info("live bundle switched to version=%s", row.version if row else None)


def with_site_thresholds(rt: Runtime, bundle: Bundle) -> tuple[Bundle, dict[str, Any]]:
    """The bundle with the site's active operating points in place of its own, and the record of them
    the result keeps (set version, thresholds, which the site set)."""
    with rt.sessions() as session:
        points = operating_points.effective(session, bundle.version, bundle.operating_points)
    return dataclasses.replace(bundle, operating_points=points.thresholds), points.as_json()


def image_inputs(src: Dataset) -> dict[str, Any]:
    """The input attributes drift compares with the training reference (no patient data)."""
    spacing = src.get("ImagerPixelSpacing") or src.get("PixelSpacing")
    try:
        mm = round(float(spacing[0]), 3) if spacing else None
    except (TypeError, ValueError, IndexError):
        mm = None
    return {
        "manufacturer": str(src.get("Manufacturer", "") or "").strip()[:64] or None,
        "modality": str(src.get("Modality", "") or "").strip() or None,
        "view": str(src.get("ViewPosition", "") or "").strip().upper() or None,
        "pixel_spacing_mm": mm,
        "photometric": str(src.get("PhotometricInterpretation", "") or "").strip() or None,
    }


class _Candidates:
    """This process's predictors of candidate bundles, by path and hash (built on first use)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_key: dict[tuple[str, str], Predictor] = {}

    def get(self, rt: Runtime, row: BundleRecord) -> Predictor:
        key = (row.path, row.sha256)
        with self._lock:
            if key not in self._by_key:
                s = rt.settings
                self._by_key[key] = Predictor(
                    load_bundle(row.path),
                    device=s.inference_device,
                    threads=s.torch_threads,
                    backend=s.inference_backend,
                    precision=s.inference_precision,
                )
            return self._by_key[key]


_CANDIDATES = _Candidates()


def run_candidates(
    rt: Runtime, job_id: str, sop_uids: Sequence[str], images: Sequence[NDArray[np.float32]]
) -> list[str]:
    """Each candidate bundle's result on the job's analysed images, stored in ``job_results``; returns
    the versions that ran."""
    with rt.sessions() as session:
        rows = bundles.candidates(session)
        session.expunge_all()
    ran = []
    for row in rows:
        try:
            predictor = _CANDIDATES.get(rt, row)
            probabilities = predictor.predict(list(images)).probabilities
            bundle, points = with_site_thresholds(rt, predictor.bundle)
        except Exception as exc:  # a broken candidate is the candidate's problem, not the job's
            log.warning("job=%s candidate=%s failed: %s", job_id, row.version, type(exc).__name__)
            continue
        entries = [_image(uid, bundle, p) for uid, p in zip(sop_uids, probabilities, strict=True)]
        result = {
            "bundle": {"name": bundle.name, "version": bundle.version},
            "operating_points": points,
            "images": entries,
        }
        _store(rt, job_id, row.version, result)
        ran.append(row.version)
    return ran


def _image(uid: str, bundle: Bundle, scores: NDArray[np.float32]) -> dict[str, Any]:
    probabilities = {label: round(float(s), 6) for label, s in zip(bundle.labels, scores, strict=True)}
    present = [label for label, s in probabilities.items() if s >= bundle.operating_points[label]]
    return {"sop_instance_uid": uid, "probabilities": probabilities, "present": present}


def _store(rt: Runtime, job_id: str, version: str, result: dict[str, Any]) -> None:
    with rt.sessions.begin() as session:
        row = session.scalars(
            select(JobResult).where(JobResult.job_id == job_id, JobResult.bundle_version == version)
        ).first()
        if row is None:
            session.add(JobResult(job_id=job_id, bundle_version=version, result=result))
        else:  # a re-run of the job: its latest result
            row.result = result
