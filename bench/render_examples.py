"""Render the heatmap Secondary Capture for the shared chest files with the shipped bundle, as PNGs
under docs/images/ (for reviewing overlay placement by eye).

Run: .venv/bin/python bench/render_examples.py
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image
from pydicom import dcmread

from service.core.settings import DEFAULT_BUNDLE
from worker.analysis import image_findings
from worker.dicom.pixels import read_display_pixels
from worker.dicom.sc import build_heatmap_sc
from worker.dicom.sr import OutputContext
from worker.inference.bundle import load_bundle
from worker.inference.predictor import Predictor
from worker.outputs import algorithm_info

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FILES = ["cr-pa-mono1-explicit-le.dcm", "sc-pa-jpeg-baseline-mono1-label.dcm"]


def main() -> None:
    bundle = load_bundle(DEFAULT_BUNDLE)
    predictor = Predictor(bundle)
    out_dir = REPO / "docs" / "images"
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        ds = dcmread(SHARED / "dicom" / "chest" / name)
        display = read_display_pixels(ds)
        pred = predictor.predict([display.pixels])
        findings, heatmaps, regions, _ = image_findings(
            bundle, pred.probabilities[0], pred.cams[0], display.pixels.shape
        )
        sc = build_heatmap_sc(
            ds,
            display.pixels,
            heatmaps,
            findings,
            regions,
            OutputContext(
                algorithm=algorithm_info(bundle),
                series_instance_uid="1.2.826.0.1.3680043.10.1453.1",
                sop_instance_uid="1.2.826.0.1.3680043.10.1453.2",
                series_number=9902,
            ),
        )
        img = Image.fromarray(sc.pixel_array)
        img.thumbnail((1200, 1200))
        target = out_dir / f"sc-{Path(name).stem}.png"
        img.save(target, optimize=True)
        print(f"{target.relative_to(REPO)}: present {[region.label for region in regions]}")


if __name__ == "__main__":
    main()
