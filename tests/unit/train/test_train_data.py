from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from monai_train.bundle import NIH_LABELS
from monai_train.data import (
    DataError,
    LeakageError,
    Splits,
    check_no_leakage,
    combine,
    data_summary,
    load_image,
    parse_label_set,
    pil_to_display,
    read_records,
    split_by_patient,
)


def test_label_sets_are_configuration() -> None:
    assert parse_label_set("nih14") == NIH_LABELS
    assert parse_label_set("pneumothorax") == ("Pneumothorax",)
    assert parse_label_set("Effusion, Edema") == ("Effusion", "Edema")
    with pytest.raises(DataError):
        parse_label_set("Effusion,effusion")
    with pytest.raises(DataError):
        parse_label_set("No Finding")


def test_records_multi_hot_by_label_set(small_set: Path) -> None:
    records = read_records(small_set / "images", small_set / "labels.csv", NIH_LABELS)
    assert len(records) == 1000 and len({r.patient_id for r in records}) == 264
    rec = next(r for r in records if r.name == "00000001_001.png")  # "Cardiomegaly|Emphysema"
    assert [lb for lb, v in zip(NIH_LABELS, rec.labels, strict=True) if v] == ["Cardiomegaly", "Emphysema"]
    one = read_records(small_set / "images", small_set / "labels.csv", ("Pneumothorax",))
    assert sum(r.labels[0] for r in one) == sum("Pneumothorax" in r.findings for r in records) > 0


def test_missing_images_are_an_error_unless_skipped(small_set: Path, tmp_path: Path) -> None:
    (tmp_path / "00000001_000.png").write_bytes((small_set / "images" / "00000001_000.png").read_bytes())
    with pytest.raises(DataError, match="not in"):
        read_records(tmp_path, small_set / "labels.csv")
    assert len(read_records(tmp_path, small_set / "labels.csv", missing="skip")) == 1


def test_patient_split_is_disjoint_and_seeded(small_set: Path) -> None:
    records = read_records(small_set / "images", small_set / "labels.csv")
    splits = split_by_patient(records, (0.7, 0.1, 0.2), seed=3)
    check_no_leakage(splits)
    patients = {name: {r.patient_id for r in recs} for name, recs in splits.items()}
    assert sum(len(p) for p in patients.values()) == 264
    assert abs(len(patients["test"]) - 0.2 * 264) <= 1 and abs(len(patients["val"]) - 0.1 * 264) <= 1
    again = split_by_patient(records, (0.7, 0.1, 0.2), seed=3)
    assert [r.name for r in again.test] == [r.name for r in splits.test]
    assert [r.name for r in split_by_patient(records, (0.7, 0.1, 0.2), seed=4).test] != [
        r.name for r in splits.test
    ]


def test_leakage_check_catches_a_planted_overlap(small_set: Path) -> None:
    records = read_records(small_set / "images", small_set / "labels.csv")
    splits = split_by_patient(records, (0.7, 0.1, 0.2), seed=0)
    # Plant it: one more image of a training patient goes into test (a different image, same patient).
    victim = next(r for r in splits.train if sum(x.patient_id == r.patient_id for x in splits.train) > 1)
    moved = next(r for r in splits.train if r.patient_id == victim.patient_id and r is not victim)
    planted = Splits(
        train=[r for r in splits.train if r is not moved], val=splits.val, test=[*splits.test, moved]
    )
    with pytest.raises(LeakageError, match=r"1 patients appear in more than one split") as err:
        check_no_leakage(planted)
    assert victim.patient_id in str(err.value)
    with pytest.raises(LeakageError, match="image leakage"):
        check_no_leakage({"train": [victim], "test": [replace(victim, patient_id="other")]})


def test_a_patient_in_two_sources_lands_in_one_split(small_set: Path, shared_dir: Path) -> None:
    dev = shared_dir / "data" / "nih-cxr14-dev"
    a = read_records(dev / "images", dev / "labels.csv")
    b = read_records(small_set / "images", small_set / "labels.csv")
    both = combine([a, b])
    assert len(both) == len(a) + len(b) - 1  # one NIH image is in both sets: kept once
    splits = split_by_patient(both, (0.7, 0.1, 0.2), seed=0)
    check_no_leakage(splits)
    assert {r.source for r in splits.test} == {"nih-cxr14-dev", "nih-cxr14-64px"}


def test_summary_hash_ignores_order(small_set: Path) -> None:
    records = read_records(small_set / "images", small_set / "labels.csv")[:50]
    s1, s2 = data_summary(records, NIH_LABELS), data_summary(records[::-1], NIH_LABELS)
    assert s1["sha256"] == s2["sha256"] and s1["images"] == 50
    assert data_summary(records[:49], NIH_LABELS)["sha256"] != s1["sha256"]


def test_png_loading_modes(tmp_path: Path) -> None:
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    expected = grey.astype(np.float32) / 255
    np.testing.assert_allclose(pil_to_display(Image.fromarray(grey)), expected, atol=1e-6)
    rgb = Image.fromarray(np.stack([grey] * 3, axis=-1))
    np.testing.assert_allclose(pil_to_display(rgb), expected, atol=1e-6)
    rgba = Image.fromarray(np.dstack([np.stack([grey] * 3, axis=-1), np.full_like(grey, 255)]))
    np.testing.assert_allclose(pil_to_display(rgba), expected, atol=1e-6)
    deep = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    img = load_image(path)
    assert img.dtype == np.float32 and img.ndim == 2
    np.testing.assert_allclose(img, expected, atol=1e-6)


def test_dicom_loading_honours_monochrome1(tmp_path: Path) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    pixels = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64).astype(np.uint16)

    def write(photometric: str) -> Path:
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SOPClassUID, ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPClassUID, generate_uid()
        ds.Rows, ds.Columns, ds.SamplesPerPixel = 8, 8, 1
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PhotometricInterpretation = photometric
        ds.WindowCenter, ds.WindowWidth = 2048, 4096
        ds.PixelData = pixels.tobytes()
        path = tmp_path / f"{photometric}.dcm"
        ds.save_as(path, enforce_file_format=True)
        return path

    mono2, mono1 = load_image(write("MONOCHROME2")), load_image(write("MONOCHROME1"))
    assert mono2.shape == (8, 8) and mono2.min() >= 0.0 and mono2.max() <= 1.0
    assert mono2[0, 0] < mono2[-1, -1]  # higher stored value = brighter
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)


def test_an_unknown_label_is_an_error_not_an_untrained_output(small_set: Path) -> None:
    with pytest.raises(DataError, match="Pneumothorx"):
        read_records(small_set / "images", small_set / "labels.csv", ("Effusion", "Pneumothorx"))


def test_a_labels_file_matching_no_image_names_the_first_unmatched(small_set: Path, tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"first unmatched: 0000"):
        read_records(tmp_path / "images", small_set / "labels.csv", missing="skip")
