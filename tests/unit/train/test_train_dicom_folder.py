"""A hospital's DICOM folder as training input: headers give patient and view, the worker's gate decides."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from monai_train.__main__ import main
from monai_train.bundle import NIH_LABELS
from monai_train.data import DataError
from monai_train.dicom_folder import is_dicom_folder, read_dicom_folder
from worker.inference.bundle import load_bundle


def _cr_from_png(png: Path, out: Path, patient: str, view: str = "PA", body: str = "CHEST") -> None:
    with Image.open(png) as im:
        pixels = (
            np.asarray(im.convert("L").resize((256, 256), Image.Resampling.BILINEAR), dtype=np.uint16) * 16
        )
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID, ds.SOPInstanceUID = (
        ds.file_meta.MediaStorageSOPClassUID,
        ds.file_meta.MediaStorageSOPInstanceUID,
    )
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition, ds.PatientID = "CR", body, view, patient
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 256, 256, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = pixels.tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)


@pytest.fixture
def pacs_export(shared_dir: Path, small_set: Path, tmp_path: Path) -> tuple[Path, Path]:
    """12 NIH images as CR files of 6 patients, 2 real chest files, 2 non-chest, 1 lateral, 1 text file."""
    root = tmp_path / "pacs"
    rows = ["Image Index,Finding Labels,Patient ID"]
    pngs = sorted((small_set / "images").glob("*.png"))[:12]
    for i, png in enumerate(pngs):
        name = f"img{i:02d}.dcm"
        _cr_from_png(png, root / f"study{i // 2}" / name, patient=f"P{i // 2}")
        rows.append(f"{name},{'Effusion' if i % 3 == 0 else 'No Finding'},CSV-IGNORED")
    _cr_from_png(pngs[0], root / "lateral" / "lat.dcm", patient="P0", view="LL")
    rows.append("lat.dcm,No Finding,")
    chest = shared_dir / "dicom" / "chest"
    (root / "real").mkdir()
    for name in ("cr-pa-mono1-explicit-le.dcm", "sc-pa-jpeg-baseline.dcm"):
        shutil.copy(chest / name, root / "real" / name)
        rows.append(f"{name},Cardiomegaly,")
    (root / "other").mkdir()
    for name in ("cr-tibia-j2k-lossless.dcm", "dx-canine-lateral-thorax.dcm"):
        shutil.copy(shared_dir / "dicom" / "not-chest" / name, root / "other" / name)
        rows.append(f"{name},No Finding,X")
    (root / "other" / "notes.txt").write_text("not an image")
    csv_path = tmp_path / "labels.csv"
    csv_path.write_text("\n".join(rows) + "\n")
    return root, csv_path


def test_the_gate_decides_and_headers_name_the_patients(pacs_export: tuple[Path, Path]) -> None:
    root, csv_path = pacs_export
    assert is_dicom_folder(root)
    records, report = read_dicom_folder(root, csv_path, NIH_LABELS)
    assert report.files == 18 and report.accepted == len(records)
    assert report.rejected["not_frontal"] == 1 and report.rejected["not_chest"] >= 1
    assert report.rejected.get("not_dicom") == 1 and sum(report.rejected.values()) == 18 - len(records)
    ours = [r for r in records if r.image.name.startswith("img")]
    assert len(ours) == 12 and {r.patient_id for r in ours} == {f"P{i}" for i in range(6)}  # headers win
    assert sum(r.labels[NIH_LABELS.index("Effusion")] for r in ours) == 4
    real = [r for r in records if r.source == "pacs" and not r.image.name.startswith("img")]
    assert {r.image.name for r in real} <= {"cr-pa-mono1-explicit-le.dcm", "sc-pa-jpeg-baseline.dcm"}


def test_train_cli_on_a_dicom_folder_reports_the_gate(pacs_export: tuple[Path, Path], tmp_path: Path) -> None:
    root, csv_path = pacs_export
    out = tmp_path / "bundle"
    args = ["train", "--images", str(root), "--labels", str(csv_path), "--out", str(out), "--version", "t"]
    args += [
        "--label-set",
        "Effusion,Cardiomegaly",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--batch-size",
        "4",
    ]
    args += ["--split", "0.6,0.2,0.2", "--log-every", "0", "--no-tensorboard"]
    main(args)
    meta = load_bundle(out).metadata["training_data"]
    folder = meta["dicom_folders"][str(root)]
    assert folder["rejected"]["not_frontal"] == 1 and folder["accepted"] >= 12


def test_a_folder_with_nothing_gated_in_is_an_error(tmp_path: Path, pacs_export: tuple[Path, Path]) -> None:
    root, csv_path = pacs_export
    only = tmp_path / "only-other"
    shutil.copytree(root / "other", only)
    with pytest.raises(DataError, match="passed the gate"):
        read_dicom_folder(only, csv_path, NIH_LABELS)
    assert pydicom.__version__


def test_evaluate_on_a_dicom_folder_reports_the_gate(pacs_export: tuple[Path, Path], tmp_path: Path) -> None:
    from monai_train.evaluate import evaluate

    root, csv_path = pacs_export
    bundle = Path(__file__).resolve().parents[3] / "worker" / "bundles" / "cxr14_densenet121"
    m = evaluate(root, csv_path, tmp_path / "m.json", bundle_dir=bundle, bootstrap_samples=20)
    assert m["dicom_folders"][str(root)]["rejected"]["not_frontal"] == 1
    assert m["n_images"] + m["refused"]["images"] == m["dicom_folders"][str(root)]["accepted"]
