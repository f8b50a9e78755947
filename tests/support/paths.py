"""Where the repository and the shared read-only data (../shared beside the repo) live."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED = REPO_ROOT.parent / "shared"
CHEST_DICOM = SHARED / "dicom" / "chest"
NOT_CHEST_DICOM = SHARED / "dicom" / "not-chest"
SR_DICOM = SHARED / "dicom" / "sr"
NIH_DEV_IMAGES = SHARED / "data" / "nih-cxr14-dev" / "images"
NIH_64PX_IMAGES = SHARED / "data" / "nih-cxr14-64px" / "images"
