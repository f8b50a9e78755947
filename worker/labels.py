"""The 14 ChestX-ray14 findings exactly as NIH spells them, in NIH order (the default bundle's outputs).

Dependency-free on purpose: training (bundle export), DICOM coding and tests all read this one list.
"""

from __future__ import annotations

from typing import Final

NIH_LABELS: Final[tuple[str, ...]] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Infiltration",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Consolidation",
    "Edema",
    "Emphysema",
    "Fibrosis",
    "Pleural_Thickening",
    "Hernia",
)
