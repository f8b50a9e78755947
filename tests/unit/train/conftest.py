"""Training-test fixtures: a few real 64 px NIH images and ONE tiny training run shared by the tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from monai_train.bundle import NIH_LABELS
from monai_train.config import TrainConfig, TrainResult
from monai_train.data import Record, Splits, read_records, split_by_patient
from monai_train.train import train_and_export

# The brief's convention: ../shared beside the repo root.
SHARED = Path(__file__).resolve().parents[3].parent / "shared"
SMALL = SHARED / "data" / "nih-cxr14-64px"


@pytest.fixture(scope="session")
def small_set(shared_dir: Path) -> Path:
    """The 64 px NIH set (``shared_dir`` skips locally / fails in CI when ../shared is absent)."""
    assert shared_dir.resolve() == SHARED.resolve()
    return SMALL


@pytest.fixture(scope="session", autouse=True)
def one_thread() -> Iterator[None]:
    # The test machine is shared: one core for these tests, restored afterwards.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pick(records: list[Record], patients: int, per_patient: int) -> list[Record]:
    """Up to ``per_patient`` images for each of the first ``patients`` patients (sorted by ID)."""
    by_patient: dict[str, list[Record]] = {}
    for rec in records:
        by_patient.setdefault(rec.patient_id, []).append(rec)
    chosen = sorted(by_patient, key=int)[:patients]
    return [rec for pid in chosen for rec in by_patient[pid][:per_patient]]


@pytest.fixture(scope="session")
def tiny_splits(small_set: Path) -> Splits:
    records = read_records(small_set / "images", small_set / "labels.csv", NIH_LABELS)
    return split_by_patient(pick(records, patients=40, per_patient=2), (0.6, 0.2, 0.2), seed=1)


@pytest.fixture(scope="session")
def trained(tiny_splits: Splits, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """2 epochs at 32 px on ~60 images: seconds on one core, enough to exercise every stage."""
    out = tmp_path_factory.mktemp("train") / "bundle"
    tc = TrainConfig(
        labels=NIH_LABELS,
        image_size=32,
        epochs=2,
        batch_size=8,
        lr=1e-3,
        seed=0,
        log_every=0,
        version="0.0.1-test",
        int8_export=True,
    )
    return train_and_export(tiny_splits, tc, out)
