"""Retraining from the archive and bundle promotion, end to end on tiny data with the real parts: the
worker analyses labelled studies with a tiny live bundle, ``export-training`` writes them de-identified,
``monai_train finetune`` makes a new bundle from them (patient-wise split, leakage check), the registry
takes it as a candidate, the worker runs it in shadow beside the live one (its result stored, nothing of
it delivered), the comparison sees it, an admin promotes it and the next job is served by it; a roll-back
restores the first. CPU time: a few seconds (32 px, one epoch, one thread)."""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from pydicom import dcmread
from pydicom.uid import DigitalXRayImageStorageForPresentation
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from monai_train.__main__ import main as monai_train
from monai_train.bundle import NIH_LABELS
from monai_train.config import TrainConfig
from monai_train.data import Record, read_records, split_by_patient
from monai_train.train import train_and_export
from service.cli import main as cli
from service.core.models import Delivery, Job, JobResult, StudyExport
from service.core.settings import DEFAULT_BUNDLE
from service.site import bundles, labels
from service.site.findings import bundle_findings
from tests.support.runtime import worker_runtime
from tests.support.site import chest_dataset
from tests.support.studies import enqueue_files, with_fresh_uids
from worker.pipeline import process_study
from worker.runtime import Runtime

PATIENTS = 12


@pytest.fixture(scope="module")
def nih(shared_dir: Path) -> Path:
    return shared_dir / "data" / "nih-cxr14-64px"


@pytest.fixture(scope="module")
def live_bundle(nih: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny bundle trained on patients other than the site's (the site's are the first 12 by ID)."""
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    records = read_records(nih / "images", nih / "labels.csv", NIH_LABELS)
    by_patient: dict[str, list[Record]] = {}
    for rec in records:
        by_patient.setdefault(rec.patient_id, []).append(rec)
    others = sorted(by_patient, key=int)[PATIENTS : PATIENTS + 30]
    splits = split_by_patient([r for p in others for r in by_patient[p][:2]], (0.6, 0.2, 0.2), seed=1)
    out = tmp_path_factory.mktemp("live") / "bundle"
    tc = TrainConfig(
        image_size=32, epochs=1, batch_size=8, seed=0, log_every=0, version="0.0.1-live", tensorboard=False
    )
    train_and_export(splits, tc, out)
    return out


def _site_studies(nih: Path, out: Path) -> list[tuple[Path, str, str]]:
    """Two single-image DX studies for each of the first patients: (file, Study UID, NIH findings)."""
    with (nih / "labels.csv").open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh)]
    chosen = sorted({r["Patient ID"] for r in rows}, key=int)[:PATIENTS]
    out.mkdir(parents=True)
    studies: list[tuple[Path, str, str]] = []
    for patient in chosen:
        for row in [r for r in rows if r["Patient ID"] == patient][:2]:
            img = Image.open(nih / "images" / row["Image Index"]).convert("L").resize((256, 256))
            ds = chest_dataset(
                np.asarray(img, dtype=np.uint8),
                sop_class=DigitalXRayImageStorageForPresentation,
                modality="DX",
                bits_stored=8,
                PatientName=f"SITE^PATIENT{patient}",
                PatientID=f"MRN{patient}",
                PatientBirthDate="19700101",
                StudyDate="20261120",
                AccessionNumber=f"ACC{len(studies)}",
                InstitutionName="General Hospital",
                ReferringPhysicianName="DOCTOR^REFERRING",
                PresentationIntentType="FOR PRESENTATION",
            )
            path = out / f"{len(studies)}.dcm"
            ds.save_as(path, enforce_file_format=True)
            studies.append((path, str(ds.StudyInstanceUID), row["Finding Labels"]))
    return studies


@pytest.fixture
def runtime(tmp_path: Path, live_bundle: Path) -> Iterator[Runtime]:
    with worker_runtime(
        tmp_path / "data", model_bundle=live_bundle, inference_device="cpu", torch_threads=1
    ) as rt:
        yield rt


def _run(rt: Runtime, path: Path) -> str:
    job_id = enqueue_files(rt, [path])
    with rt.sessions.begin() as s:  # as the listener records it from the header
        job = s.get(Job, job_id)
        assert job is not None
        job.study.patient_id = str(dcmread(path, stop_before_pixels=True).PatientID)
    process_study(job_id, rt)
    return job_id


def test_export_finetune_register_shadow_promote(runtime: Runtime, nih: Path, tmp_path: Path) -> None:
    settings = runtime.settings
    studies = _site_studies(nih, tmp_path / "site")
    jobs = [_run(runtime, path) for path, _, _ in studies[:-2]]
    with runtime.sessions.begin() as s:
        _label(s, studies[:-2])
        assert {j.status for j in s.scalars(select(Job))} == {"done"}

    # Export, twice: the same pseudonyms both times, nothing identifying in the files or the CSV.
    exported = tmp_path / "export"
    result = CliRunner().invoke(cli, ["export-training", "--out", str(exported)], env=_env(settings))
    assert result.exit_code == 0, result.output
    patients = {dcmread(path).PatientID for path, _, _ in studies[:-2]}
    assert f"exported {len(jobs)} labelled studies of {len(patients)} patients" in result.output, (
        result.output
    )
    again = tmp_path / "export2"
    assert (
        CliRunner().invoke(cli, ["export-training", "--out", str(again)], env=_env(settings)).exit_code == 0
    )
    files = sorted((exported / "images").rglob("*.dcm"))
    assert len(files) == len(jobs)
    assert sorted(p.relative_to(exported) for p in files) == sorted(
        p.relative_to(again) for p in (again / "images").rglob("*.dcm")
    )
    originals = {str(dcmread(p).SOPInstanceUID) for p, _, _ in studies}
    for path in files:
        ds = dcmread(path)
        assert str(ds.SOPInstanceUID) not in originals and str(ds.PatientID).startswith("P")
        assert str(ds.PatientName) == str(ds.PatientID) and ds.PatientIdentityRemoved == "YES"
        for keyword in (
            "PatientBirthDate",
            "StudyDate",
            "AccessionNumber",
            "InstitutionName",
            "ReferringPhysicianName",
        ):
            assert keyword not in ds
    text = (exported / "labels.csv").read_text()
    assert "MRN" not in text and "SITE^" not in text
    with runtime.sessions() as s:
        assert s.scalar(select(func.count()).select_from(StudyExport)) == 2 * len(jobs)

    # Fine-tune the live bundle on the export: monai_train's own patient-wise split and leakage check.
    candidate = tmp_path / "candidate"
    monai_train(
        [
            "finetune", "--from", str(settings.model_bundle), "--images", str(exported / "images"),
            "--labels", str(exported / "labels.csv"), "--out", str(candidate), "--version", "0.0.2-site",
            "--epochs", "1", "--batch-size", "64", "--log-every", "0", "--threads", "1",
            "--no-tensorboard", "--split", "0.6,0.2,0.2", "--device", "cpu",
        ]
    )  # fmt: skip
    meta = json.loads((candidate / "configs" / "metadata.json").read_text())
    assert meta["version"] == "0.0.2-site"

    # Register: the configured bundle becomes the live row, the new one a candidate.
    with runtime.sessions.begin() as s:
        bundles.register(s, candidate, settings.model_bundle, username="admin")
        assert [(b.version, b.status) for b in bundles.all_bundles(s)] == [
            ("0.0.1-live", "live"),
            ("0.0.2-site", "candidate"),
        ]
    # Shadow: the next job is served by the live bundle; the candidate's result is stored beside it.
    shadowed = _run(runtime, studies[-2][0])
    with runtime.sessions.begin() as s:
        _label(s, studies[-2:-1])
    with runtime.sessions() as s:
        job = s.get(Job, shadowed)
        assert job is not None and job.bundle_version == "0.0.1-live"
        shadow = s.scalars(select(JobResult).where(JobResult.job_id == shadowed)).one()
        assert shadow.bundle_version == "0.0.2-site"
        assert len(shadow.result["images"][0]["probabilities"]) == len(meta["labels"])
        # Nothing of the candidate can be sent: every delivery row is one of the live job's own outputs.
        paths = {d.output_path for d in s.scalars(select(Delivery).where(Delivery.job_id == shadowed))}
        assert len(paths) == 3 and all(p.startswith(f"{shadowed}/") for p in paths)
        compared = {c.version: c for c in bundles.compare(s)}
        assert {c.study_id for c in compared["0.0.2-site"].cases} == {job.study_id}
        assert len(compared["0.0.1-live"].cases) == len(jobs) + 1

    # Promote: the next job is served by the promoted bundle; then roll back.
    with runtime.sessions.begin() as s:
        new, old = bundles.promote(s, "0.0.2-site")
        assert (new.status, old and old.status) == ("live", "retired")
    promoted = _run(runtime, studies[-1][0])
    with runtime.sessions() as s:
        job = s.get(Job, promoted)
        assert job is not None and job.bundle_version == "0.0.2-site"
        assert job.result is not None and job.result["bundle"]["version"] == "0.0.2-site"
        assert s.scalars(select(JobResult).where(JobResult.job_id == promoted)).all() == []
    with runtime.sessions.begin() as s:
        bundles.promote(s, "0.0.1-live")
    rolled_back = _run(runtime, with_fresh_uids(studies[0][0], tmp_path / "resent.dcm"))
    with runtime.sessions() as s:
        job = s.get(Job, rolled_back)
        assert job is not None and job.bundle_version == "0.0.1-live"


def _label(session: Session, studies: list[tuple[Path, str, str]]) -> None:
    """Reference labels (the NIH findings) of received studies, as a RIS export would give them."""
    rows = "".join(f"{uid},{found}\n" for _, uid, found in studies)
    model = bundle_findings(DEFAULT_BUNDLE)  # the NIH 14 findings
    labels.import_labels(
        session, f"StudyInstanceUID,Findings\n{rows}".encode(), model, username="r", filename=None
    )


def _env(settings: object) -> dict[str, str]:
    s = settings
    return {"CXR_DATA_DIR": str(s.data_dir), "CXR_MODEL_BUNDLE": str(s.model_bundle)}  # type: ignore[attr-defined]
