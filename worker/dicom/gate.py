"""The input gate lives in `worker.gate`, shared with training; kept so ``worker.dicom.gate`` imports work."""

from __future__ import annotations

from worker.gate import (
    IMAGE_SOP_CLASSES,
    SECONDARY_CAPTURE,
    GateDecision,
    GateRules,
    SizeLimits,
    check_header,
    check_size,
)

__all__ = [
    "IMAGE_SOP_CLASSES",
    "SECONDARY_CAPTURE",
    "GateDecision",
    "GateRules",
    "SizeLimits",
    "check_header",
    "check_size",
]
