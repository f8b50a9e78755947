"""``python -m monai_train``: bundle tooling for ML engineers (init-bundle, train, finetune, evaluate)."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from monai_train.bundle import NIH_LABELS, export_untrained, inference_config
from monai_train.config import TrainConfig
from monai_train.losses import LOSSES
from monai_train.metrics import OPERATING_POINT_METHODS

if TYPE_CHECKING:
    from monai_train.data import Splits

UNTRAINED_CARD = """# cxr14_densenet121 — UNTRAINED demonstration bundle

**Not for diagnostic use. This network has never seen an image.**

- Architecture: MONAI `DenseNet121`, 2-D, 1 input channel, 14 sigmoid outputs (ChestX-ray14 order).
- Weights: random initialisation with `torch.manual_seed({seed})`, stored as fp16 safetensors.
- Preprocessing: `configs/inference.json` (resize to 224 × 224, area; intensity (x − 0.5) / 0.25 on
  display values in [0, 1]).
- Operating points: 0.5 for every finding (no validation data was used to choose them).
- Metrics: none measured — its outputs are meaningless. It exists so the gateway runs end to end;
  `monai_train` replaces it with a trained bundle.
"""


def init_bundle(out: Path, seed: int) -> None:
    export_untrained(
        out,
        inference_config(len(NIH_LABELS)),
        seed=seed,
        version="0.0.1-untrained",
        model_card=UNTRAINED_CARD.format(seed=seed),
        training_data={"images": 0, "note": "untrained: random initialisation"},
    )


def _fractions(text: str) -> tuple[float, float, float]:
    parts = tuple(float(x) for x in text.split(","))
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("--split takes three fractions: train,val,test")
    return parts  # type: ignore[return-value]


def _add_image_args(p: argparse.ArgumentParser, labels_help: str) -> None:
    p.add_argument("--images", type=Path, action="append", required=True, help="image folder (repeatable)")
    p.add_argument("--labels", type=Path, action="append", required=True, help=labels_help)


def _add_training_args(p: argparse.ArgumentParser, *, finetune: bool) -> None:
    _add_image_args(p, "NIH-format label CSV (repeat, paired in order with --images)")
    p.add_argument("--out", type=Path, required=True, help="bundle directory to write")
    p.add_argument(
        "--label-map",
        type=Path,
        default=None,
        help="JSON mapping of any label CSV (columns, synonyms, uncertain policy, No Finding, split column)",
    )
    p.add_argument(
        "--test-images",
        type=Path,
        action="append",
        default=None,
        help="external test set folder (repeatable)",
    )
    p.add_argument("--test-labels", type=Path, action="append", default=None, help="its label CSV")
    p.add_argument(
        "--label-set",
        "--labels-set",
        dest="label_set",
        default=None if finetune else "nih14",
        help="nih14, or comma-separated findings (e.g. Pneumothorax or Effusion,Edema)",
    )
    p.add_argument("--version", required=True, help="bundle version string, e.g. 0.2.0-demo")
    p.add_argument(
        "--config",
        type=Path,
        default=None,
        help="training settings JSON (a bundle's configs/train.json) as defaults; flags override it",
    )
    p.add_argument("--name", default="cxr14_densenet121")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--image-size",
        type=int,
        default=None if finetune else 224,
        help="square input size" + (" (default: the source bundle's)" if finetune else ""),
    )
    p.add_argument(
        "--feature-stride",
        type=int,
        choices=(32, 16, 8),
        default=None if finetune else 32,
        help="input pixels per heatmap cell: 32 (DenseNet-121), 16 or 8 (transitions without pooling)"
        + ("; default: the source bundle's (the weights fit either: pooling has none)" if finetune else ""),
    )
    if not finetune:
        p.add_argument(
            "--histogram-equalise",
            action="store_true",
            help="equalise each image's histogram in the bundle's preprocessing (the worker applies it too)",
        )
        p.add_argument(
            "--clahe",
            action="store_true",
            help="CLAHE (8 x 8 tiles, clip 2) after the resize, in the bundle's preprocessing (worker too)",
        )


def _add_schedule_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3, help="one-cycle peak learning rate")
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--loss", choices=LOSSES, default="bce")
    p.add_argument("--focal-gamma", type=float, default=2.0)
    p.add_argument("--pos-weight-max", type=float, default=20.0)
    p.add_argument("--no-augment", action="store_true")
    p.add_argument(
        "--low-res",
        type=int,
        default=0,
        help="resolution matching: pool this share (--low-res-prob) of training images to N px and back",
    )
    p.add_argument("--low-res-prob", type=float, default=0.5)
    p.add_argument(
        "--distill-weight",
        type=float,
        default=0.0,
        help="weight of a BCE towards --reference-predictions on the training images it covers (0: off)",
    )
    p.add_argument(
        "--split", type=_fractions, default=(0.7, 0.1, 0.2), help="train,val,test patient fractions"
    )
    p.add_argument("--no-stratify", action="store_true", help="split all sources together, not one by one")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--operating-point", choices=OPERATING_POINT_METHODS, default="f1")


def _add_run_args(p: argparse.ArgumentParser, *, finetune: bool) -> None:
    p.add_argument("--log-every", type=int, default=20, help="progress line every N steps")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument(
        "--checkpoint-dir", type=Path, default=None, help="default: <out>.checkpoints beside --out"
    )
    p.add_argument("--resume", action="store_true", help="continue from <checkpoint-dir>/last.pt")
    p.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="preprocessed-image cache (default: <checkpoint-dir>/cache)",
    )
    p.add_argument(
        "--workers", type=int, default=0, help="processes decoding into the cache and reading it (0: none)"
    )
    p.add_argument(
        "--no-tensorboard", action="store_true", help="no event files in <checkpoint-dir>/tensorboard"
    )
    p.add_argument("--stop-after", type=int, default=None, help="stop after this epoch (resume later)")
    p.add_argument("--fp32", action="store_true", help="store fp32 weights (default fp16)")
    p.add_argument(
        "--int8",
        action="store_true",
        help="also write the CPU worker's int8 graph, checked on validation (as the quantize command)",
    )
    p.add_argument(
        "--reference-predictions",
        type=Path,
        default=None,
        help="CSV of reference probabilities (Image Index, prob_<label>): compared on test images, and the "
        "soft targets of --distill-weight on training images",
    )
    p.add_argument("--notes", type=Path, default=None, help="markdown file appended to the model card")
    p.add_argument("--limit", type=int, default=0, help="use only the first N images (smoke runs)")
    if finetune:
        p.add_argument("--from", dest="from_bundle", type=Path, required=True, help="bundle to start from")


def _config_defaults(path: Path) -> dict[str, object]:
    """configs/train.json → argparse defaults (the flag names' destinations)."""
    from monai_train.config import TRAIN_SETTINGS

    raw = json.loads(path.read_text())
    unknown = sorted(set(raw) - set(TRAIN_SETTINGS))
    if unknown:
        raise SystemExit(f"{path}: unknown training settings {unknown} (known: {list(TRAIN_SETTINGS)})")
    out: dict[str, object] = {k: v for k, v in raw.items() if k not in {"labels", "augment"}}
    if "labels" in raw:
        out["label_set"] = ",".join(raw["labels"])
    if "augment" in raw:
        out["no_augment"] = not raw["augment"]
    return out


def _labels(args: argparse.Namespace) -> tuple[str, ...]:
    from monai_train.data import parse_label_set

    spec = args.label_set
    from_bundle = getattr(args, "from_bundle", None)
    if spec is None and from_bundle is not None:  # finetune without --label-set keeps the bundle's labels
        spec = json.loads((from_bundle / "configs" / "metadata.json").read_text())["labels"]
    return parse_label_set(spec)


def _read_training_data(
    args: argparse.Namespace, labels: tuple[str, ...]
) -> tuple[Splits, dict[str, object]]:
    """The patient-wise splits of every --images folder (+ external test sets) and the DICOM gate report."""
    from monai_train.data import check_no_leakage, combine, read_records, split_by_patient, splits_from_column
    from monai_train.dicom_folder import is_dicom_folder, read_dicom_folder
    from monai_train.labelmap import NIH, LabelMap

    label_map = LabelMap.from_file(args.label_map) if args.label_map else NIH
    datasets = []
    input_report: dict[str, object] = {}
    for folder, csv_path in zip(args.images, args.labels, strict=True):
        if is_dicom_folder(folder):
            # A PACS export: Patient ID and view from the headers, the worker's input gate applied.
            recs, report = read_dicom_folder(folder, csv_path, labels, label_map=label_map)
            input_report[str(folder)] = report.as_json()
            print(f"{folder}: {report.accepted} of {report.files} DICOM files in; refused {report.rejected}")
        else:
            recs = read_records(folder, csv_path, labels, label_map=label_map)
        datasets.append(recs)
    records = combine(datasets)[: args.limit or None]
    if records and all(r.split for r in records):
        splits = splits_from_column(records)  # the label file's own split (mapping: split_column)
        print(f"predefined split: {len(splits.train)}/{len(splits.val)}/{len(splits.test)} images")
    else:
        splits = split_by_patient(records, args.split, args.seed, stratify_by_source=not args.no_stratify)
    for folder, csv_path in zip(args.test_images or [], args.test_labels or [], strict=True):
        # External test sets: measured only, never trained or tuned on (checked for patient overlap below).
        splits.test += read_records(
            folder, csv_path, labels, source=f"external:{folder.name}", label_map=label_map
        )
    check_no_leakage(splits)
    return splits, input_report


def _train_config(
    args: argparse.Namespace, labels: tuple[str, ...], input_report: dict[str, object]
) -> TrainConfig:
    from_bundle = getattr(args, "from_bundle", None)
    tc = TrainConfig(
        labels=labels,
        image_size=args.image_size or 224,
        feature_stride=args.feature_stride or 0,  # 0: the source bundle's (finetune)
        histogram_equalise=getattr(args, "histogram_equalise", False),
        clahe=getattr(args, "clahe", False),
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        loss=args.loss,
        focal_gamma=args.focal_gamma,
        pos_weight_max=args.pos_weight_max,
        augment=not args.no_augment,
        low_res=args.low_res,
        low_res_prob=args.low_res_prob,
        distill_weight=args.distill_weight,
        seed=args.seed,
        operating_point=args.operating_point,
        log_every=args.log_every,
        device=args.device,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        name=args.name,
        version=args.version,
        fp16_export=not args.fp32,
        int8_export=args.int8,
        reference_predictions=args.reference_predictions,
        notes=args.notes.read_text() if args.notes else "",
        init_from=from_bundle,
        stop_after=args.stop_after,
        cache_dir=args.cache_dir,
        input_report=input_report,
        workers=args.workers,
        tensorboard=not args.no_tensorboard,
    )
    if from_bundle is not None and args.image_size is None:
        tc.image_size = 0  # init_from_bundle keeps the source bundle's size
    return tc


def run_training(args: argparse.Namespace) -> None:
    from monai_train.config import TrainingStopped
    from monai_train.train import train_and_export

    if len(args.images) != len(args.labels):
        raise SystemExit("give one --labels CSV for each --images folder")
    if len(args.test_images or []) != len(args.test_labels or []):
        raise SystemExit("give one --test-labels CSV for each --test-images folder")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    labels = _labels(args)
    splits, input_report = _read_training_data(args, labels)
    tc = _train_config(args, labels, input_report)
    try:
        result = train_and_export(splits, tc, args.out)
    except TrainingStopped as stopped:
        print(stopped)
        return
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    if not result.metrics:  # a DDP process other than rank 0: rank 0 wrote the bundle
        return
    m = result.metrics
    print(
        f"bundle written to {args.out}: best epoch {result.best_epoch}, temperature "
        f"{result.temperature:.3f}, test mean AUROC {m['mean_auroc']} on {m['n_images']} images"
    )


def _evaluate_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "evaluate",
        help="measure a bundle on labelled images, as the worker runs it, refusing its own training patients",
    )
    _add_image_args(ev, "NIH-format label CSV (may be .csv.gz): one for all folders, or one per --images")
    ev.add_argument("--bundle", type=Path, default=None, help="default: worker/bundles/cxr14_densenet121")
    ev.add_argument("--out", type=Path, required=True, help="metrics.json to write (curves go beside it)")
    ev.add_argument("--heatmaps", type=Path, default=None, help="write DIR/<image>/<finding>.npy CAMs")
    ev.add_argument(
        "--boxes",
        type=Path,
        default=None,
        help="NIH-format box CSV (Image Index, Finding Label, x, y, w, h): pointing game and box hit rate",
    )
    ev.add_argument(
        "--box-space",
        type=int,
        default=1024,
        help="side of the square image the box coordinates refer to (NIH: 1024)",
    )
    ev.add_argument(
        "--allow-overlap",
        action="store_true",
        help="measure images of the bundle's train/val patients in a separate block (never the headline)",
    )
    ev.add_argument(
        "--compare-reference",
        type=Path,
        default=None,
        help="CSV of reference probabilities (Image Index, prob_<label>) for a side-by-side",
    )
    ev.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95 %% intervals")
    ev.add_argument(
        "--versus",
        type=Path,
        default=None,
        help="a second bundle measured on the same images (neither's train/val patients): paired difference",
    )
    ev.add_argument(
        "--cam-method",
        choices=("auto", "cam", "gradcam++", "gradcam"),
        default="auto",
        help="explanation method scored by --boxes (auto: CAM for a DenseNet head)",
    )
    for flag, whose in (("--precision", "the bundle"), ("--versus-precision", "the --versus bundle")):
        ev.add_argument(
            flag,
            choices=("auto", "fp32", "int8"),
            default="auto",
            help=f"how {whose} runs (auto: as the worker would here, int8 on a CPU when the bundle ships it)",
        )
    ev.add_argument("--seed", type=int, default=0)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--threads", type=int, default=0)


def _calibrate_parser(sub: Any) -> None:
    cal = sub.add_parser(
        "calibrate",
        help="fit per-finding Platt calibration on a bundle's validation split; report ECE on its test split",
    )
    cal.add_argument("--bundle", type=Path, required=True)
    _add_image_args(cal, "label CSV (repeat, paired in order with --images)")
    cal.add_argument("--out", type=Path, default=None, help="write the report (JSON) here")
    cal.add_argument(
        "--write",
        action="store_true",
        help="store the calibration in the bundle (only done when it lowers the test-split ECE)",
    )
    cal.add_argument("--version", default=None, help="new bundle version string when written")
    cal.add_argument("--threads", type=int, default=0)


def _check_pairs(args: argparse.Namespace) -> None:
    if len(args.images) != len(args.labels):
        raise SystemExit("give one --labels CSV for each --images folder")


def _save_report(args: argparse.Namespace, report: dict[str, Any]) -> None:
    if args.out is not None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


def _run_calibrate(args: argparse.Namespace) -> None:
    from monai_train.calibrate import recalibrate_bundle

    _check_pairs(args)
    report = recalibrate_bundle(
        args.bundle,
        args.images,
        args.labels,
        write=args.write,
        threads=args.threads,
        version=args.version,
    )
    _save_report(args, report)
    e = report["ece_test"]
    print(
        f"test ECE {e['before']} -> {e['after']} ({report['measured_on']['images']} images); "
        f"{'written to the bundle' if report['written'] else 'bundle unchanged'}"
    )


def _quantize_parser(sub: Any) -> None:
    q = sub.add_parser(
        "quantize",
        help="write the bundle's int8 CPU graph (models/model.int8.onnx): calibrated on its training "
        "images, checked against the fp32 graph on its validation images",
    )
    q.add_argument("--bundle", type=Path, required=True)
    _add_image_args(q, "label CSV (repeat, paired in order with --images)")
    q.add_argument("--calibration-images", type=int, default=128, help="training images that set the ranges")
    q.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest change of a calibrated probability allowed on the validation images (default 0.1)",
    )
    q.add_argument("--out", type=Path, default=None, help="write the report (JSON) here")
    q.add_argument("--threads", type=int, default=0)


def _run_quantize(args: argparse.Namespace) -> None:
    from monai_train.quantize import quantize_from_splits
    from worker.inference.quantize import QuantizationRejected

    _check_pairs(args)
    try:
        report = quantize_from_splits(
            args.bundle,
            args.images,
            args.labels,
            calibration_images=args.calibration_images,
            tolerance=args.tolerance,
            threads=args.threads,
        )
    except (QuantizationRejected, ValueError, FileNotFoundError) as exc:
        raise SystemExit(f"error: {exc}") from exc
    _save_report(args, report)
    print(
        f"wrote models/model.int8.onnx: on {report['check_images']} validation images the largest "
        f"probability change is {report['max_abs_probability_change']:.4f} (mean "
        f"{report['mean_abs_probability_change']:.4f}), maps r = {report['map_correlation_median']}; "
        f"validation mean AUROC fp32 {report['val_mean_auroc_fp32']:.4f}, "
        f"int8 {report['val_mean_auroc_int8']:.4f}"
    )


def _run_evaluate(args: argparse.Namespace) -> None:
    from monai_train.evaluate import DEFAULT_BUNDLE, EvaluationError, evaluate, summary_line

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        m = evaluate(
            args.images,
            args.labels,
            args.out,
            bundle_dir=args.bundle or DEFAULT_BUNDLE,
            heatmaps=args.heatmaps,
            boxes=args.boxes,
            box_space=args.box_space,
            allow_overlap=args.allow_overlap,
            reference_csv=args.compare_reference,
            batch_size=args.batch_size,
            threads=args.threads,
            bootstrap_samples=args.bootstrap,
            seed=args.seed,
            versus=args.versus,
            cam_method=args.cam_method,
            precision=args.precision,
            versus_precision=args.versus_precision,
        )
    except EvaluationError as exc:
        raise SystemExit(f"evaluate: {exc}") from exc
    line = summary_line(m)
    ref = m.get("reference_comparison")
    if ref:
        line += (
            f"; on the {ref['n_images']} images the reference scored: this bundle "
            f"{ref['model']['mean_auroc']}, reference {ref['reference']['mean_auroc']}"
        )
    print(f"{line}; metrics written to {args.out}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="monai_train")
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init-bundle", help="write an untrained bundle (random initialisation)")
    init.add_argument("--out", type=Path, required=True)
    init.add_argument("--seed", type=int, default=0)
    train = sub.add_parser("train", help="train a DenseNet-121 from scratch and export a bundle")
    _add_training_args(train, finetune=False)
    _add_schedule_args(train)
    _add_run_args(train, finetune=False)
    finetune = sub.add_parser("finetune", help="continue training a bundle, possibly on another label set")
    _add_training_args(finetune, finetune=True)
    _add_schedule_args(finetune)
    _add_run_args(finetune, finetune=True)
    _evaluate_parser(sub)
    _calibrate_parser(sub)
    onnx = sub.add_parser("export-onnx", help="(re)write models/model.onnx from a bundle's weights")
    onnx.add_argument("--bundle", type=Path, required=True)
    _quantize_parser(sub)
    args = parser.parse_args(argv)
    if getattr(args, "config", None) is not None:
        # configs/train.json (e.g. a shipped bundle's) as defaults; flags given on the command line win.
        sub_parser = train if args.command == "train" else finetune
        sub_parser.set_defaults(**_config_defaults(args.config))
        args = parser.parse_args(argv)
    if args.command == "export-onnx":
        from worker.inference.onnx import export_onnx

        print(f"wrote {export_onnx(args.bundle)}")
        return
    if args.command == "calibrate":
        _run_calibrate(args)
        return
    if args.command == "quantize":
        _run_quantize(args)
        return
    if args.command != "init-bundle":
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if args.command == "init-bundle":
        init_bundle(args.out, args.seed)
        print(f"bundle written to {args.out}")
    elif args.command in {"train", "finetune"}:
        run_training(args)
    elif args.command == "evaluate":
        _run_evaluate(args)


if __name__ == "__main__":
    main()
