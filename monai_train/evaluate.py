"""Evaluating a bundle exactly as the worker runs it, in a way that cannot flatter it.

Only the bundle is loaded, through the worker's own loader and Predictor (``worker.inference``), so
preprocessing, weights (fp16 → fp32) and calibration are the worker's by construction, not a copy.

What keeps the figures honest:

- images whose **patient** is in the bundle's training or validation split (``docs/splits.csv``) are
  refused: they are not measured, and are counted in ``refused``; ``allow_overlap`` measures them in a
  separate ``overlap`` block, never in the headline;
- every AUROC (per finding and the mean) comes with a 95 % bootstrap interval, resampling *patients*;
- results are split by source folder and by image resolution, so 64 px thumbnails cannot hide a weak
  full-resolution figure;
- with boxes (the NIH ``BBox_List_2017.csv`` format), the heatmaps are scored by the pointing game (the
  peak the outputs mark lies in the radiologist's box) and the box hit rate (the region the outputs draw
  overlaps the box), beside the hit rate of chance.
"""

from __future__ import annotations

import csv
import gzip
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw

from monai_train.data import Record, combine, load_image, read_records
from monai_train.metrics import (
    bootstrap_auroc,
    compute_metrics,
    paired_bootstrap_difference,
    write_curves,
)
from monai_train.reference import reference_comparison
from monai_train.split_file import read_split_file
from worker.inference.bundle import Bundle, load_bundle
from worker.inference.predictor import Predictor
from worker.regions import finding_region

log = logging.getLogger("monai_train")

DEFAULT_BUNDLE = Path(__file__).resolve().parents[1] / "worker" / "bundles" / "cxr14_densenet121"
# NIH's bounding boxes are in the pixels of the released 1024 × 1024 PNGs.
NIH_BOX_SPACE = 1024
# The box file's finding names where they differ from the label file's.
BOX_LABEL_SYNONYMS = {"Infiltrate": "Infiltration"}


class EvaluationError(ValueError):
    """Nothing can be measured honestly (e.g. every image's patient trained the bundle)."""


def _safe(name: str) -> str:
    # Finding names become file names; NIH's have no separators, but a custom label set might.
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


# ---------------------------------------------------------------------------------------------- overlap


def learned_patients(bundle_dir: Path) -> tuple[dict[str, str], dict[str, str]] | None:
    """(patient → split, image → split) for the bundle's train and val splits; None without splits.csv."""
    rows = read_split_file(bundle_dir)
    if rows is None:
        return None
    learned = [row for row in rows if row[2] in {"train", "val"}]
    return {patient: split for _, patient, split in learned}, {image: split for image, _, split in learned}


def partition_overlap(
    records: Sequence[Record], learned: tuple[dict[str, str], dict[str, str]] | None
) -> tuple[list[Record], list[Record]]:
    """(clean, overlapping): a record overlaps when its patient or its image trained or tuned the bundle."""
    if learned is None:
        return list(records), []
    patients, images = learned
    clean = [r for r in records if r.patient_id not in patients and r.name not in images]
    overlap = [r for r in records if r.patient_id in patients or r.name in images]
    return clean, overlap


# ---------------------------------------------------------------------------------------------- boxes


@dataclass(frozen=True)
class Box:
    image: str
    label: str
    x: float
    y: float
    w: float
    h: float


def read_boxes(path: Path, labels: Sequence[str]) -> list[Box]:
    """NIH-format box CSV rows (``Image Index, Finding Label, x, y, w, h``) of findings in ``labels``."""
    opener = gzip.open if path.suffix == ".gz" else open
    boxes: list[Box] = []
    with opener(path, "rt", newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if not header or header[0].strip() != "Image Index" or len(header) < 6:
            raise EvaluationError(f"{path}: expected columns Image Index, Finding Label, x, y, w, h")
        for row in reader:
            if len(row) < 6 or not row[0].strip():
                continue
            label = BOX_LABEL_SYNONYMS.get(row[1].strip(), row[1].strip())
            if label not in labels:
                continue
            x, y, w, h = (float(v) for v in row[2:6])
            boxes.append(Box(row[0].strip(), label, x, y, w, h))
    return boxes


def score_boxes(
    boxes: Sequence[Box],
    cams: dict[str, npt.NDArray[np.float32]],
    sizes: dict[str, tuple[int, int]],
    labels: Sequence[str],
    box_space: int = NIH_BOX_SPACE,
) -> dict[str, Any]:
    """Pointing game and box hit rate over ``boxes`` whose image has maps in ``cams`` ((L, h, w) each).

    The region and its peak are `worker.regions.finding_region`'s: exactly what the SR, SC and GSPS mark.
    A pointing hit: the peak lies in the box. A box hit: the drawn region overlaps the box. Chance: the
    hit rate of a point drawn uniformly over the image (the box's share of the image area). The drawn
    regions' mean share of the image says how cheap a box hit was: a larger region overlaps more boxes.
    """
    per: dict[str, dict[str, int]] = {}
    chance: list[float] = []
    areas: list[float] = []
    hits = box_hits = 0
    used = 0
    for box in boxes:
        if box.image not in cams:
            continue
        rows, cols = sizes[box.image]
        sx, sy = cols / box_space, rows / box_space
        x0, y0, x1, y1 = box.x * sx, box.y * sy, (box.x + box.w) * sx, (box.y + box.h) * sy
        region = finding_region(box.label, cams[box.image][labels.index(box.label)], rows, cols)
        used += 1
        stats = per.setdefault(box.label, {"boxes": 0, "pointing_hits": 0, "box_hits": 0})
        stats["boxes"] += 1
        chance.append(
            max(0.0, min(x1, cols) - max(x0, 0)) * max(0.0, min(y1, rows) - max(y0, 0)) / (rows * cols)
        )
        if region is None:
            continue
        px, py = region.peak
        point_hit = x0 <= px <= x1 and y0 <= py <= y1
        mask = Image.new("1", (cols, rows), 0)
        ImageDraw.Draw(mask).polygon(list(region.polygon), fill=1)
        arr = np.asarray(mask, dtype=bool)
        areas.append(float(arr.mean()))
        r0, r1 = max(int(y0), 0), min(int(np.ceil(y1)), rows)
        c0, c1 = max(int(x0), 0), min(int(np.ceil(x1)), cols)
        box_hit = bool(arr[r0:r1, c0:c1].any()) if r1 > r0 and c1 > c0 else False
        hits += point_hit
        box_hits += box_hit
        stats["pointing_hits"] += int(point_hit)
        stats["box_hits"] += int(box_hit)
    return {
        "boxes": used,
        "pointing_game": round(hits / used, 6) if used else None,
        "box_hit_rate": round(box_hits / used, 6) if used else None,
        "chance_pointing": round(float(np.mean(chance)), 6) if chance else None,
        "mean_region_area": round(float(np.mean(areas)), 6) if areas else None,
        "per_finding": per,
        "box_space": box_space,
        "notes": [
            "peak and region are worker.regions.finding_region's (what the SR/SC/GSPS mark); boxes scaled "
            f"from a {box_space}-px square to each image's size",
        ],
    }


# ---------------------------------------------------------------------------------------------- measuring


def _predict(
    predictor: Predictor,
    bundle: Bundle,
    records: Sequence[Record],
    batch_size: int,
    heatmaps: Path | None,
    keep_cams: set[str],
) -> tuple[npt.NDArray[np.float32], dict[str, npt.NDArray[np.float32]], dict[str, tuple[int, int]]]:
    probs: list[npt.NDArray[np.float32]] = []
    cams: dict[str, npt.NDArray[np.float32]] = {}
    sizes: dict[str, tuple[int, int]] = {}
    for start in range(0, len(records), batch_size):
        chunk = records[start : start + batch_size]
        images = [load_image(r.image) for r in chunk]
        for rec, img in zip(chunk, images, strict=True):
            sizes[rec.name] = (int(img.shape[0]), int(img.shape[1]))
        pred = predictor.predict(images)
        probs.append(pred.probabilities)
        for rec, maps in zip(chunk, pred.cams, strict=True):
            if rec.name in keep_cams:
                cams[rec.name] = maps
            if heatmaps is not None:
                folder = heatmaps / rec.image.stem
                folder.mkdir(parents=True, exist_ok=True)
                for label, cam in zip(bundle.labels, maps, strict=True):
                    np.save(folder / f"{_safe(label)}.npy", cam.astype(np.float32))
        log.info("evaluated %d/%d images", min(start + batch_size, len(records)), len(records))
    n = len(bundle.labels)
    return (np.concatenate(probs) if probs else np.zeros((0, n), np.float32)), cams, sizes


def _measure(
    records: Sequence[Record],
    p: npt.NDArray[np.float32],
    bundle: Bundle,
    sizes: dict[str, tuple[int, int]],
    *,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """Metrics + intervals for ``records``, and the same split by source folder and by resolution."""
    y = np.asarray([r.labels for r in records], dtype=np.float32).reshape(-1, len(bundle.labels))
    out = compute_metrics(y, p, bundle.labels, bundle.operating_points)
    out.update(
        bootstrap_auroc(y, p, bundle.labels, [r.patient_id for r in records], samples=samples, seed=seed)
    )
    out["patients"] = len({r.patient_id for r in records})

    def groups(key: Any) -> dict[str, Any]:
        found: dict[str, list[int]] = {}
        for i, rec in enumerate(records):
            found.setdefault(key(rec), []).append(i)
        result: dict[str, Any] = {}
        for name, idx in sorted(found.items()):
            gm = compute_metrics(y[idx], p[idx], bundle.labels, bundle.operating_points)
            ci = bootstrap_auroc(
                y[idx],
                p[idx],
                bundle.labels,
                [records[i].patient_id for i in idx],
                samples=samples,
                seed=seed,
            )
            result[name] = {
                "n_images": len(idx),
                "patients": len({records[i].patient_id for i in idx}),
                "mean_auroc": gm["mean_auroc"],
                "mean_auroc_ci95": ci["mean_auroc_ci95"],
                "mean_auroc_labels": gm["mean_auroc_labels"],
                "auroc": gm["auroc"],
                "auroc_ci95": ci["auroc_ci95"],
                "ece": gm["ece"],
                "positives": gm["positives"],
            }
        return result

    def resolution(rec: Record) -> str:
        rows, cols = sizes[rec.name]
        return f"{cols}x{rows}"

    out["by_source"] = groups(lambda r: r.source)
    out["by_resolution"] = groups(resolution)
    return out


def evaluate(
    images: Path | Sequence[Path],
    labels_csv: Path | Sequence[Path],
    out: Path,
    *,
    bundle_dir: Path = DEFAULT_BUNDLE,
    heatmaps: Path | None = None,
    boxes: Path | None = None,
    box_space: int = NIH_BOX_SPACE,
    allow_overlap: bool = False,
    reference_csv: Path | None = None,
    batch_size: int = 16,
    threads: int = 0,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    versus: Path | None = None,
    cam_method: str = "auto",
    precision: str = "auto",
    versus_precision: str = "auto",
) -> dict[str, Any]:
    """Write ``out`` (metrics.json) plus ``<stem>_roc.png``, ``<stem>_pr.png`` and
    ``<stem>_predictions.csv`` beside it; with ``heatmaps``, ``<dir>/<image stem>/<finding>.npy``.

    Several image folders may be given, with one label CSV for all or one per folder.
    """
    folders = [images] if isinstance(images, Path) else list(images)
    csvs = [labels_csv] if isinstance(labels_csv, Path) else list(labels_csv)
    if len(csvs) == 1 and len(folders) > 1:
        csvs = csvs * len(folders)
    if len(csvs) != len(folders):
        raise EvaluationError("give one label CSV for all image folders, or one per folder")
    bundle = load_bundle(bundle_dir)
    records, gate_reports = _read_datasets(folders, csvs, bundle.labels)
    other = load_bundle(versus) if versus is not None else None
    learned = _learned_by_either(bundle_dir, versus)
    clean, overlap = partition_overlap(records, learned)
    refused = _refusal(records, overlap, allow_overlap)
    if learned is None:
        log.warning(
            "%s has no docs/splits.csv: cannot check images against its training patients", bundle_dir
        )
    if not clean and not allow_overlap:
        raise EvaluationError(
            f"all {len(records)} images are of patients in {bundle.name}'s training or validation split "
            f"(e.g. {', '.join(refused['examples'])}): nothing can be measured honestly; "
            "--allow-overlap measures them in a separate block"
        )
    box_list = read_boxes(boxes, bundle.labels) if boxes is not None else []
    keep = {b.image for b in box_list}

    # precision "auto": what the worker runs on this machine (the bundle's int8 graph on a CPU when shipped).
    predictor = Predictor(bundle, threads=threads, cam_method=cam_method, precision=precision)
    t0 = time.monotonic()
    p, cams, sizes = _predict(predictor, bundle, clean, batch_size, heatmaps, keep)
    metrics: dict[str, Any] = (
        _measure(clean, p, bundle, sizes, samples=bootstrap_samples, seed=seed)
        if clean
        else {
            "n_images": 0,
            "mean_auroc": None,
            "notes": ["no image outside the bundle's train/val patients"],
        }
    )
    metrics["headline"] = (
        "images whose patients are outside the bundle's training and validation splits"
        if learned is not None
        else "all images (the bundle has no docs/splits.csv: overlap with its training data NOT checked)"
    )
    metrics["overlap_check"] = "docs/splits.csv" if learned is not None else "unavailable"
    metrics["refused"] = refused
    if gate_reports:
        metrics["dicom_folders"] = gate_reports
    metrics["bundle"] = _bundle_block(bundle, bundle_dir)
    metrics["images"] = str(folders[0]) if len(folders) == 1 else [str(f) for f in folders]
    metrics["labels_csv"] = str(csvs[0]) if len(set(csvs)) == 1 else [str(c) for c in csvs]
    names = [r.name for r in clean]
    y = np.asarray([r.labels for r in clean], dtype=np.float32).reshape(-1, len(bundle.labels))
    if reference_csv is not None and clean:
        metrics["reference_comparison"] = reference_comparison(names, y, p, bundle.labels, reference_csv)
    if box_list:
        metrics["localisation"] = score_boxes(box_list, cams, sizes, bundle.labels, box_space)
    if other is not None and clean:
        if other.labels != bundle.labels:
            raise EvaluationError(f"--versus bundle has labels {other.labels}, not {bundle.labels}")
        versus_predictor = Predictor(other, threads=threads, precision=versus_precision)
        op, _, _ = _predict(versus_predictor, other, clean, batch_size, None, set())
        metrics["versus"] = _versus(clean, y, p, op, other, sizes, samples=bootstrap_samples, seed=seed)
        metrics["versus"]["inference"] = versus_predictor.description
    if allow_overlap and overlap:
        op, ocams, osizes = _predict(predictor, bundle, overlap, batch_size, heatmaps, keep)
        block = _measure(overlap, op, bundle, osizes, samples=bootstrap_samples, seed=seed)
        block["warning"] = (
            "NOT a measure of the model: these patients trained or tuned it; reported for comparison only"
        )
        if box_list:
            block["localisation"] = score_boxes(box_list, ocams, osizes, bundle.labels, box_space)
        metrics["overlap"] = block
        _write_predictions(
            out.parent / f"{out.stem}_overlap_predictions.csv", [r.name for r in overlap], op, bundle
        )
    metrics["cam_method"] = predictor.cam_method
    metrics["inference"] = predictor.description
    metrics["seconds"] = round(time.monotonic() - t0, 2)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2) + "\n")
    if clean:
        write_curves(y, p, bundle.labels, out.parent, prefix=f"{out.stem}_")
    _write_predictions(out.parent / f"{out.stem}_predictions.csv", names, p, bundle)
    return metrics


def _read_datasets(
    folders: Sequence[Path], csvs: Sequence[Path], labels: Sequence[str]
) -> tuple[list[Record], dict[str, Any]]:
    """The records of every folder (rows of a larger CSV whose image is not there are skipped) and, for
    DICOM folders, the worker's gate report."""
    from monai_train.dicom_folder import is_dicom_folder, read_dicom_folder

    datasets: list[list[Record]] = []
    gate_reports: dict[str, Any] = {}
    for folder, csv_path in zip(folders, csvs, strict=True):
        if is_dicom_folder(folder):
            # A PACS export: the worker's gate decides what is measured, as it would in production.
            recs, report = read_dicom_folder(folder, csv_path, labels)
            gate_reports[str(folder)] = report.as_json()
            datasets.append(recs)
        else:
            datasets.append(read_records(folder, csv_path, labels, missing="skip"))
    return combine(datasets), gate_reports


def _learned_by_either(bundle_dir: Path, versus: Path | None) -> tuple[dict[str, str], dict[str, str]] | None:
    """The patients and images the bundle (and the --versus bundle) trained or tuned on: a comparison is
    fair only on images neither learned from."""
    learned = learned_patients(bundle_dir)
    theirs = learned_patients(versus) if versus is not None else None
    if learned is not None and theirs is not None:
        return {**theirs[0], **learned[0]}, {**theirs[1], **learned[1]}
    return theirs if theirs is not None else learned


def _refusal(records: Sequence[Record], overlap: Sequence[Record], allow_overlap: bool) -> dict[str, Any]:
    """What was kept out of the headline, and why (logged too)."""
    refused: dict[str, Any] = {
        "images": len(overlap),
        "patients": len({r.patient_id for r in overlap}),
        "measured_separately": allow_overlap and bool(overlap),
        "examples": [r.name for r in overlap[:5]],
        "reason": "the patient (or image) is in the bundle's training or validation split (docs/splits.csv)",
    }
    if overlap:
        log.warning(
            "%d of %d images (%d patients) are of patients that trained or tuned this bundle: %s",
            len(overlap),
            len(records),
            refused["patients"],
            "measured in a separate 'overlap' block, not in the headline"
            if allow_overlap
            else "refused (--allow-overlap measures them separately)",
        )
    return refused


def _bundle_block(bundle: Bundle, bundle_dir: Path) -> dict[str, Any]:
    return {
        "path": str(bundle_dir),
        "name": bundle.name,
        "version": bundle.version,
        "sha256": bundle.sha256,
        "temperature": bundle.temperature,
        "calibration": bundle.calibration.method if bundle.calibration else "temperature",
        "calibrated": bundle.calibrated,
    }


def _versus(
    records: Sequence[Record],
    y: npt.NDArray[np.float32],
    p: npt.NDArray[np.float32],
    op: npt.NDArray[np.float32],
    other: Bundle,
    sizes: dict[str, tuple[int, int]],
    *,
    samples: int,
    seed: int,
) -> dict[str, Any]:
    """The other bundle on the same images: its figures and the paired difference (this − other)."""
    patients = [r.patient_id for r in records]
    out: dict[str, Any] = {
        "bundle": {"name": other.name, "version": other.version, "sha256": other.sha256},
        "mean_auroc": compute_metrics(y, op, other.labels)["mean_auroc"],
        **bootstrap_auroc(y, op, other.labels, patients, samples=samples, seed=seed),
        **paired_bootstrap_difference(y, p, op, other.labels, patients, samples=samples, seed=seed),
        "by_resolution": {},
    }
    for name in sorted({f"{sizes[r.name][1]}x{sizes[r.name][0]}" for r in records}):
        idx = [i for i, r in enumerate(records) if f"{sizes[r.name][1]}x{sizes[r.name][0]}" == name]
        out["by_resolution"][name] = {
            "n_images": len(idx),
            **paired_bootstrap_difference(
                y[idx], p[idx], op[idx], other.labels, [patients[i] for i in idx], samples=samples, seed=seed
            ),
        }
    return out


def _write_predictions(path: Path, names: Sequence[str], p: npt.NDArray[np.float32], bundle: Bundle) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["Image Index", *(f"prob_{lb}" for lb in bundle.labels)])
        for name, row in zip(names, p, strict=True):
            writer.writerow([name, *(f"{v:.6f}" for v in row)])


def _interval(ci: Sequence[float | None] | None) -> str:
    if not ci or ci[0] is None or ci[1] is None:
        return "n/a"
    return f"{ci[0]:.3f}–{ci[1]:.3f}"


def summary_line(m: dict[str, Any]) -> str:
    """The one line ``evaluate`` prints: the headline with its interval, what was refused, by group."""
    if not m.get("n_images"):
        line = "no image could be measured honestly"
    else:
        line = (
            f"{m['n_images']} images ({m['patients']} patients): mean AUROC {m['mean_auroc']} "
            f"(95 % CI {_interval(m.get('mean_auroc_ci95'))})"
        )
        groups = m.get("by_resolution") or {}
        if len(groups) > 1:
            line += "; by resolution " + ", ".join(
                f"{k}: {v['mean_auroc']} ({_interval(v['mean_auroc_ci95'])}, {v['n_images']} images)"
                for k, v in groups.items()
            )
    refused = m.get("refused") or {}
    if refused.get("images"):
        line += f"; {refused['images']} images of {refused['patients']} training/validation patients " + (
            "measured separately ('overlap', not the headline)"
            if refused["measured_separately"]
            else "refused"
        )
    vs = m.get("versus")
    if vs:
        line += (
            f"; versus {vs['bundle']['version']}: {vs['mean_auroc']}, difference "
            f"{vs['mean_auroc_difference']} (95 % CI {_interval(vs['difference_ci95'])})"
        )
    loc = m.get("localisation")
    if loc and loc.get("boxes"):
        line += (
            f"; pointing game {loc['pointing_game']} (chance {loc['chance_pointing']}), box hit rate "
            f"{loc['box_hit_rate']} on {loc['boxes']} boxes"
        )
    return line
