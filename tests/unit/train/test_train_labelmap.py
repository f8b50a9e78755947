"""Labels from any CSV through a mapping file; predefined splits; external test sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from monai_train.__main__ import main
from monai_train.bundle import NIH_LABELS
from monai_train.data import DataError, LeakageError, read_records, splits_from_column
from monai_train.labelmap import LabelMap, LabelMapError
from worker.inference.bundle import load_bundle

LABELS = ("Effusion", "Cardiomegaly")


def _chexpert_style(small_set: Path, tmp_path: Path, n: int = 40) -> tuple[Path, Path]:
    """Per-finding columns with 1 / 0 / -1 / blank, other column names, a split column by patient."""
    with (small_set / "labels.csv").open(newline="") as fh:
        nih = list(csv.DictReader(fh))[:n]
    patients = sorted({r["Patient ID"] for r in nih}, key=int)
    split_of = {
        p: ("train" if i % 5 < 3 else "validation" if i % 5 == 3 else "Test") for i, p in enumerate(patients)
    }
    path = tmp_path / "site.csv"
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Path", "MRN", "Pleural Effusion", "Cardiomegaly", "Split"])
        for i, r in enumerate(nih):
            eff = "1" if "Effusion" in r["Finding Labels"] else ("-1" if i % 7 == 0 else "")
            w.writerow(
                [
                    r["Image Index"],
                    r["Patient ID"],
                    eff,
                    "1.0" if "Cardiomegaly" in r["Finding Labels"] else "0",
                    split_of[r["Patient ID"]],
                ]
            )
    mapping = tmp_path / "map.json"
    mapping.write_text(
        json.dumps(
            {
                "image_column": "Path",
                "patient_column": "MRN",
                "finding_columns": {"Effusion": "Pleural Effusion", "Cardiomegaly": "Cardiomegaly"},
                "uncertain": "negative",
                "split_column": "Split",
            }
        )
    )
    return path, mapping


def test_per_finding_columns_and_the_uncertain_policy(small_set: Path, tmp_path: Path) -> None:
    csv_path, mapping = _chexpert_style(small_set, tmp_path)
    lm = LabelMap.from_file(mapping)
    zeros = read_records(small_set / "images", csv_path, LABELS, label_map=lm)
    ones = read_records(
        small_set / "images",
        csv_path,
        LABELS,
        label_map=LabelMap.from_dict({**json.loads(mapping.read_text()), "uncertain": "positive"}),
    )
    nih = {r.name: r for r in read_records(small_set / "images", small_set / "labels.csv", NIH_LABELS)}
    for rec in zeros:
        assert rec.labels == tuple(int(lb in nih[rec.name].findings) for lb in LABELS)
        assert rec.patient_id == nih[rec.name].patient_id
    uncertain = sum(o.labels[0] - z.labels[0] for o, z in zip(ones, zeros, strict=True))
    assert uncertain > 0  # U-Ones counts the -1 cells as positive, U-Zeros does not
    splits = splits_from_column(zeros)
    assert len(splits.train) and len(splits.val) and len(splits.test)


def test_a_listed_findings_column_with_synonyms_and_no_finding_names(small_set: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(
        "file,mrn,labels\n00000013_005.png,13,Pleural effusion;Infiltrate\n00000013_006.png,13,Normal\n"
    )
    lm = LabelMap.from_dict(
        {
            "image_column": "file",
            "patient_column": "mrn",
            "findings_column": "labels",
            "separator": ";",
            "synonyms": {"Pleural effusion": "Effusion", "Infiltrate": "Infiltration"},
            "no_finding": ["Normal"],
        }
    )
    recs = read_records(
        small_set / "images", csv_path, ("Effusion", "Infiltration"), label_map=lm, missing="skip"
    )
    by = {r.name: r.labels for r in recs}
    assert by == {"00000013_005.png": (1, 1), "00000013_006.png": (0, 0)}


def test_mapping_mistakes_are_errors(small_set: Path, tmp_path: Path) -> None:
    with pytest.raises(LabelMapError, match="unknown keys"):
        LabelMap.from_dict({"image_colum": "x"})
    with pytest.raises(LabelMapError, match="uncertain"):
        LabelMap.from_dict({"uncertain": "ignore"})
    csv_path, mapping = _chexpert_style(small_set, tmp_path)
    with pytest.raises(DataError, match="Pneumothorax"):  # not a column of this mapping
        read_records(
            small_set / "images",
            csv_path,
            ("Effusion", "Pneumothorax"),
            label_map=LabelMap.from_file(mapping),
        )
    with pytest.raises(DataError, match="lacks columns"):
        read_records(
            small_set / "images", small_set / "labels.csv", LABELS, label_map=LabelMap.from_file(mapping)
        )


def test_a_predefined_split_that_leaks_a_patient_is_refused(small_set: Path, tmp_path: Path) -> None:
    csv_path, mapping = _chexpert_style(small_set, tmp_path)
    rows = list(csv.reader(csv_path.open(newline="")))
    patient = rows[1][1]
    same = [i for i, r in enumerate(rows) if i and r[1] == patient]
    assert len(same) >= 2, "the fixture needs a patient with two images"
    rows[same[0]][4], rows[same[1]][4] = "train", "test"
    with csv_path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    recs = read_records(small_set / "images", csv_path, LABELS, label_map=LabelMap.from_file(mapping))
    with pytest.raises(LeakageError):
        splits_from_column(recs)


def test_train_cli_with_a_mapping_split_column_and_an_external_test_set(
    small_set: Path, tmp_path: Path
) -> None:
    csv_path, mapping = _chexpert_style(small_set, tmp_path, n=40)
    with (small_set / "labels.csv").open(newline="") as fh:
        nih = list(csv.DictReader(fh))
    used = {r["Patient ID"] for r in nih[:40]}
    ext_rows = [r for r in nih[40:] if r["Patient ID"] not in used][:8]
    ext = tmp_path / "ext.csv"
    with ext.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["Path", "MRN", "Pleural Effusion", "Cardiomegaly", "Split"])
        for r in ext_rows:
            w.writerow([r["Image Index"], r["Patient ID"], int("Effusion" in r["Finding Labels"]), 0, "test"])
    out = tmp_path / "b"
    args = [
        "train",
        "--images",
        str(small_set / "images"),
        "--labels",
        str(csv_path),
        "--label-map",
        str(mapping),
    ]
    args += [
        "--test-images",
        str(small_set / "images"),
        "--test-labels",
        str(ext),
        "--label-set",
        "Effusion,Cardiomegaly",
    ]
    args += [
        "--out",
        str(out),
        "--version",
        "t",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--log-every",
        "0",
        "--no-tensorboard",
    ]
    main(args)
    splits = {
        row["Image Index"]: row["split"] for row in csv.DictReader((out / "docs" / "splits.csv").open())
    }
    assert all(splits[r["Image Index"]] == "test" for r in ext_rows)
    site = {r[0]: r[4] for r in csv.reader(csv_path.open()) if r[0] != "Path"}
    norm = {"train": "train", "validation": "val", "test": "test"}
    assert all(splits[name] == norm[s.lower()] for name, s in site.items())
    assert load_bundle(out).labels == LABELS
