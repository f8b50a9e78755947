"""The validation report an admin hands to a committee: one HTML file with the figures and two PNG
charts (ROC curves, reliability diagrams) embedded, drawn with Pillow (no plotting library)."""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from jinja2 import Environment, FileSystemLoader, select_autoescape
from PIL import Image, ImageDraw, ImageFont

from service.site.validation import FindingFigures, Proportion, ValidationReport

PANEL = 240
MARGIN = 34
COLUMNS = 4
INK = (30, 30, 30)
GRID = (215, 215, 215)
CURVE = (31, 119, 180)
DIAGONAL = (160, 160, 160)
_ENV = Environment(
    loader=FileSystemLoader(Path(__file__).parent / "templates"), autoescape=select_autoescape(["html"])
)

Plot = Callable[[ImageDraw.ImageDraw, FindingFigures, Callable[[float, float], tuple[float, float]]], None]


def _panel_grid(
    figures: Sequence[FindingFigures], title: str, x_label: str, y_label: str, plot: Plot
) -> bytes:
    rows = max(1, math.ceil(len(figures) / COLUMNS))
    width, height = COLUMNS * PANEL, rows * PANEL + 30
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    font, small = ImageFont.load_default(size=14), ImageFont.load_default(size=11)
    draw.text((8, 6), title, fill=INK, font=font)
    for n, fig in enumerate(figures):
        x0, y0 = (n % COLUMNS) * PANEL, 30 + (n // COLUMNS) * PANEL
        left, top, size = x0 + MARGIN, y0 + 22, PANEL - MARGIN - 12

        def at(x: float, y: float, left: int = left, top: int = top, size: int = size) -> tuple[float, float]:
            return left + x * size, top + (1 - y) * size

        draw.text((left, y0 + 4), f"{fig.finding.replace('_', ' ')} (n={fig.studies})", fill=INK, font=small)
        for tick in (0.0, 0.5, 1.0):
            draw.line([at(tick, 0), at(tick, 1)], fill=GRID)
            draw.line([at(0, tick), at(1, tick)], fill=GRID)
            draw.text((at(tick, 0)[0] - 6, top + size + 2), f"{tick:g}", fill=INK, font=small)
            draw.text((left - 22, at(0, tick)[1] - 6), f"{tick:g}", fill=INK, font=small)
        draw.rectangle([at(0, 1), at(1, 0)], outline=INK)
        draw.line([at(0, 0), at(1, 1)], fill=DIAGONAL)
        draw.text((left + size / 2 - 30, top + size + 12), x_label, fill=INK, font=small)
        draw.text((x0 + 2, top - 14), y_label, fill=INK, font=small)
        plot(draw, fig, at)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def _roc(
    draw: ImageDraw.ImageDraw, fig: FindingFigures, at: Callable[[float, float], tuple[float, float]]
) -> None:
    if fig.auroc is None:
        draw.text(at(0.3, 0.5), "one class only", fill=INK)
        return
    draw.line([at(fpr, tpr) for _, tpr, fpr in fig.roc] + [at(1, 1)], fill=CURVE, width=2)
    if fig.sensitivity.value is not None and fig.specificity.value is not None:
        x, y = at(1 - fig.specificity.value, fig.sensitivity.value)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], outline=(214, 39, 40), width=2)  # the operating point
    draw.text(at(0.45, 0.12), f"AUROC {fig.auroc:.3f}", fill=INK)


def _reliability(
    draw: ImageDraw.ImageDraw, fig: FindingFigures, at: Callable[[float, float], tuple[float, float]]
) -> None:
    points = [(b.mean_score, b.observed.value, b.count) for b in fig.calibration if b.count]
    line = [at(m, o) for m, o, _ in points if m is not None and o is not None]
    if len(line) > 1:
        draw.line(line, fill=CURVE, width=2)
    for m, o, count in points:
        if m is None or o is None:
            continue
        x, y = at(m, o)
        r = 2 + min(6.0, math.sqrt(count))  # larger dots for fuller bins
        draw.ellipse([x - r, y - r, x + r, y + r], fill=CURVE)


def roc_png(report: ValidationReport) -> bytes:
    """ROC curves, one panel per finding, the operating point circled."""
    return _panel_grid(
        report.findings, "ROC on the site's labelled studies", "1 - specificity", "sensitivity", _roc
    )


def calibration_png(report: ValidationReport) -> bytes:
    """Reliability diagrams: mean score of each bin against the fraction truly present."""
    return _panel_grid(
        report.findings, "Calibration (reliability bins)", "mean score", "observed", _reliability
    )


def fmt(p: Proportion | None, digits: int = 2) -> str:
    """'0.85 (0.78–0.90)', or '—' when there is nothing to estimate."""
    if p is None or p.value is None or p.low is None or p.high is None:
        return "—"
    return f"{p.value:.{digits}f} ({p.low:.{digits}f}–{p.high:.{digits}f})"


def fmt_auroc(fig: FindingFigures) -> str:
    if fig.auroc is None:
        return "—"
    if fig.auroc_low is None or fig.auroc_high is None:
        return f"{fig.auroc:.3f}"
    return f"{fig.auroc:.3f} ({fig.auroc_low:.3f}–{fig.auroc_high:.3f})"


def charts_base64(report: ValidationReport) -> dict[str, str]:
    """The two charts as base64 PNG, for data: URIs (pages and the report carry them inline)."""
    return {
        "roc": base64.b64encode(roc_png(report)).decode(),
        "calibration": base64.b64encode(calibration_png(report)).decode(),
    }


def render_html(report: ValidationReport, *, site: str = "", model: str = "") -> str:
    """The self-contained report (inline style, images as data: URIs): one file to mail or print."""
    return _ENV.get_template("validation_report.html").render(
        report=report,
        charts=charts_base64(report),
        fmt=fmt,
        fmt_auroc=fmt_auroc,
        site=site,
        model=model,
        made_at=datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
    )
