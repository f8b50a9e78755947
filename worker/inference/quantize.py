"""An int8 copy of the bundle's ONNX graph for the CPU path (``models/model.int8.onnx``), kept only when it
agrees with the fp32 graph.

Static quantization (ONNX Runtime, QDQ format): the convolutions' weights per output channel and their
inputs per tensor, with activation ranges from entropy calibration on the bundle's own training images.
Only the convolutions are quantized: DenseNet concatenates feature maps of very different ranges, and a
quantized Concat must share one scale across them (minmax calibration over every op moved calibrated
probabilities by up to 0.44 on the shipped bundle's test images; convolutions alone with entropy
calibration by 0.05). The copy is then checked against the fp32 graph on images the calibration did not
see (the bundle's validation split): the largest change of a calibrated probability must stay within a
tolerance, or no int8 graph is written. What was measured is stored in ``configs/metadata.json``
(``int8``), so the worker and whoever audits a result can see it.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from worker.inference.bundle import INT8_WEIGHTS, METADATA, ONNX_WEIGHTS, load_bundle

# The largest change of a calibrated probability the int8 graph may make on the check images.
DEFAULT_TOLERANCE = 0.1
CALIBRATION_METHOD = "entropy"


class QuantizationRejected(RuntimeError):
    """The int8 graph disagrees with the fp32 graph beyond the tolerance: nothing was written."""


def quantize_bundle(
    bundle_dir: Path,
    calibration: Sequence[NDArray[np.float32]],
    check: Sequence[NDArray[np.float32]],
    *,
    tolerance: float = DEFAULT_TOLERANCE,
    threads: int = 0,
    notes: dict[str, Any] | None = None,
    measure: Callable[[NDArray[np.float32], NDArray[np.float32]], dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Write ``models/model.int8.onnx`` from the bundle's ``models/model.onnx``, calibrated on
    ``calibration`` (display images, as the worker sees them), if on ``check`` no calibrated probability
    moves by more than ``tolerance``. Returns the agreement report, stored in metadata under ``int8``;
    ``measure(fp32 probabilities, int8 probabilities)`` on the check images adds its own figures to it.

    Raises :class:`QuantizationRejected` (and leaves no int8 graph) when the check fails.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from worker.inference.predictor import Precision, Predictor

    if not calibration or not check:
        raise ValueError("quantization needs calibration images and check images")
    if not (bundle_dir / ONNX_WEIGHTS).is_file():
        raise FileNotFoundError(f"{bundle_dir / ONNX_WEIGHTS} is missing: export the ONNX graph first")
    target = bundle_dir / INT8_WEIGHTS
    meta_path = bundle_dir / METADATA
    _set_report(meta_path, None)  # no report while the graph is being made: the worker keeps to fp32
    target.unlink(missing_ok=True)
    fp32 = Predictor(load_bundle(bundle_dir), threads=threads, backend="onnx", precision=Precision.FP32)
    batches = [fp32.prepare([img]).numpy() for img in calibration]

    class _Reader(CalibrationDataReader):  # type: ignore[misc]  # onnxruntime is untyped
        def __init__(self) -> None:
            self._left: Iterator[NDArray[np.float32]] = iter(batches)

        def get_next(self) -> dict[str, NDArray[np.float32]] | None:
            batch = next(self._left, None)
            return None if batch is None else {"image": batch}

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(bundle_dir / ONNX_WEIGHTS), str(prepared))
        quantize_static(
            str(prepared),
            str(target),
            _Reader(),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["Conv"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.Entropy,
        )
    int8 = Predictor(load_bundle(bundle_dir), threads=threads, backend="onnx", precision=Precision.INT8)
    found, p_fp32, p_int8 = agreement(fp32, int8, check)
    report = {
        **found,
        "calibration_images": len(calibration),
        "calibration_method": CALIBRATION_METHOD,
        "quantized_ops": ["Conv"],
        "tolerance": tolerance,
        **(notes or {}),
        **(measure(p_fp32, p_int8) if measure is not None else {}),
    }
    if report["max_abs_probability_change"] > tolerance:
        target.unlink()
        raise QuantizationRejected(
            f"int8 graph moves a calibrated probability by {report['max_abs_probability_change']:.3f} "
            f"(> {tolerance}) on {len(check)} check images: not written"
        )
    _set_report(meta_path, report)
    return report


def _set_report(meta_path: Path, report: dict[str, Any] | None) -> None:
    meta = json.loads(meta_path.read_text())
    if report is None and "int8" not in meta:
        return
    if report is None:
        del meta["int8"]
    else:
        meta["int8"] = report
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")


def agreement(
    reference: Any, other: Any, images: Sequence[NDArray[np.float32]]
) -> tuple[dict[str, Any], NDArray[np.float32], NDArray[np.float32]]:
    """How far ``other``'s calibrated probabilities and maps are from ``reference``'s on ``images`` (two
    Predictors of one bundle): the largest and mean probability change, the maps' correlation (median,
    5th percentile) and how often a map's peak cell is the same; then both sets of probabilities."""
    probs: tuple[list[NDArray[np.float32]], list[NDArray[np.float32]]] = ([], [])
    corr: list[float] = []
    same_peak: list[bool] = []
    for img in images:
        a, b = reference.predict([img]), other.predict([img])
        probs[0].append(a.probabilities)
        probs[1].append(b.probabilities)
        for ma, mb in zip(a.cams[0], b.cams[0], strict=True):
            fa, fb = ma.ravel(), mb.ravel()
            if fa.std() > 0 and fb.std() > 0:
                corr.append(float(np.corrcoef(fa, fb)[0, 1]))
            same_peak.append(int(fa.argmax()) == int(fb.argmax()))
    p_ref, p_other = np.concatenate(probs[0]), np.concatenate(probs[1])
    changes = np.abs(p_ref - p_other)
    found = {
        "check_images": len(images),
        "max_abs_probability_change": round(float(changes.max()), 6),
        "mean_abs_probability_change": round(float(changes.mean()), 6),
        "map_correlation_median": round(float(np.median(corr)), 6) if corr else None,
        "map_correlation_p5": round(float(np.percentile(corr, 5)), 6) if corr else None,
        "same_peak_cell": round(float(np.mean(same_peak)), 6),
    }
    return found, p_ref, p_other
