"""Render an AuditReport as one self-contained HTML page (inline CSS, base64 PNG/JPEG)."""

from __future__ import annotations

import base64
import html
import io
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")  # no display on workers; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator
from PIL import Image

from arc2face_engine.audit.composition_html import composition_html
from arc2face_engine.audit.report import AuditReport, Histogram, PlotData

if TYPE_CHECKING:
    from arc2face_engine.dataset.reader import DatasetReader

THUMBNAIL = 72

CSS = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1100px}
h1 .pass{color:#1a7f37}h1 .fail{color:#cf222e}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left}
.plots img{max-width:48%;margin:.5%}.sheet img{margin:1px}.sheet td{border:none}
li.problem{color:#cf222e}li.warning{color:#9a6700}code{font-size:90%}
"""


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    return base64.b64encode(buffer.getvalue()).decode()


def _img(data: str, kind: str = "png", alt: str = "") -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/{kind};base64,{data}">'


def _bars(ax, histogram: Histogram, label: str) -> None:
    edges = np.asarray(histogram.edges)
    ax.stairs(np.asarray(histogram.counts), edges, fill=True, alpha=0.5, label=label)
    # Counts: whole-number ticks, on an axis that reaches 1 even when every bin is empty
    # (the locator gives fractions below a span of one).
    ax.update_datalim([(edges[0], 0), (edges[0], 1)])
    ax.autoscale_view()
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _similarity_plot(report: AuditReport) -> str | None:
    quality = report.quality
    if quality is None or quality.similarity_accepted is None:
        return None
    figure, ax = plt.subplots(figsize=(5, 3.2))
    _bars(ax, quality.similarity_accepted, "accepted")
    _bars(ax, quality.similarity_rejected, "rejected")
    ax.set(title="similarity to identity", xlabel="cosine", ylabel="images")
    ax.legend()
    return _png(figure)


def _accept_rate_plot(plots: PlotData) -> str | None:
    if not len(plots.accept_rates):
        return None
    figure, ax = plt.subplots(figsize=(5, 3.2))
    rates = np.sort(plots.accept_rates)
    ax.plot(np.arange(len(rates)), rates, marker="." if len(rates) < 200 else None)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # ranks
    ax.set(title="accept rate per identity (sorted)", xlabel="identity rank", ylabel="rate",
           ylim=(0, 1.05))  # fmt: skip
    return _png(figure)


def _angle_plot(pairs: np.ndarray, angle: str) -> str | None:
    """Requested vs measured head `angle` (yaw or pitch), one point per sampled image."""
    if not len(pairs):
        return None
    figure, ax = plt.subplots(figsize=(5, 3.2))
    ax.scatter(pairs[:, 0], pairs[:, 1], s=4, alpha=0.5)
    low, high = float(pairs.min()), float(pairs.max())
    ax.plot([low, high], [low, high], color="gray", linewidth=1)
    ax.set(title=f"{angle}: requested vs measured", xlabel="requested (deg)",
           ylabel="measured (deg)")  # fmt: skip
    return _png(figure)


def _inter_class_plot(report: AuditReport) -> str | None:
    quality = report.quality
    if quality is None or quality.inter_class_histogram is None:
        return None
    figure, ax = plt.subplots(figsize=(5, 3.2))
    _bars(ax, quality.inter_class_histogram, "centre pairs")
    ax.axvline(1 - quality.radius, color="red", linewidth=1, label="1 - radius")
    ax.set(title="inter-class cosine (identity centres)", xlabel="cosine", ylabel="pairs")
    ax.legend()
    return _png(figure)


def _feature_norm_plot(report: AuditReport) -> str | None:
    quality = report.quality
    accepted = quality.feature_norm_accepted if quality is not None else None
    if accepted is None or accepted.histogram is None:
        return None
    figure, ax = plt.subplots(figsize=(5, 3.2))
    _bars(ax, accepted.histogram, "accepted")
    rejected = quality.feature_norm_rejected
    if rejected is not None and rejected.histogram is not None and rejected.count:
        _bars(ax, rejected.histogram, "rejected")
    ax.set(title="ArcFace feature norm (before normalisation)", xlabel="norm", ylabel="images")
    ax.legend()
    return _png(figure)


def _thumbnail(reader: DatasetReader, path: str) -> str:
    try:
        with Image.open(io.BytesIO(reader.read_image_bytes(path))) as image:
            image = image.convert("RGB")
            image.thumbnail((THUMBNAIL, THUMBNAIL))
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=80)
        return _img(base64.b64encode(buffer.getvalue()).decode(), "jpeg", path)
    except Exception:
        return f"<span title='{html.escape(path)}'>unreadable</span>"


def _contact_sheet(reader: DatasetReader | None, plots: PlotData) -> str:
    if reader is None or not plots.contact_sheet:
        return ""
    rows = [
        f"<tr><td><code>{html.escape(identity)}</code></td><td>"
        + "".join(_thumbnail(reader, path) for path in paths)
        + "</td></tr>"
        for identity, paths in plots.contact_sheet.items()
    ]
    return "<h2>Contact sheet</h2><table class='sheet'>" + "".join(rows) + "</table>"


def _key_values(pairs: dict) -> str:
    cells = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(_fmt(value))}</td></tr>"
        for key, value in pairs.items()
    )
    return f"<table>{cells}</table>"


def _fmt(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _coverage(report: AuditReport) -> str:
    quality = report.quality
    if quality is None:
        return ""
    parts = []
    for title, coverage in (
        ("Poses", quality.pose_coverage),
        ("Expressions", quality.expression_coverage),
    ):
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td>{count.accepted}</td><td>{count.total}</td></tr>"
            for name, count in sorted(coverage.items())
        )
        parts.append(
            f"<h3>{title}</h3><table><tr><th>name</th><th>accepted</th><th>total</th></tr>{rows}</table>"
        )
    return "".join(parts)


def _list(items: list[str], css: str) -> str:
    if not items:
        return "<p>none</p>"
    return (
        "<ul>" + "".join(f"<li class='{css}'>{html.escape(item)}</li>" for item in items) + "</ul>"
    )


def render_html(report: AuditReport, plots: PlotData, reader: DatasetReader | None = None) -> str:
    """The whole report page as a string; thumbnails are read through `reader` when given."""
    verdict = (
        "<span class='pass'>PASSED</span>" if report.passed else "<span class='fail'>FAILED</span>"
    )
    images = [
        (_similarity_plot(report), "similarity to identity"),
        (_accept_rate_plot(plots), "accept rate per identity"),
        (_angle_plot(plots.yaw_pairs, "yaw"), "yaw: requested vs measured"),
        (_angle_plot(plots.pitch_pairs, "pitch"), "pitch: requested vs measured"),
        (_inter_class_plot(report), "inter-class cosine"),
        (_feature_norm_plot(report), "ArcFace feature norm"),
    ]
    plot_html = "".join(_img(data, alt=alt) for data, alt in images if data)
    leakage = f"<h2>Leakage</h2><p>{html.escape(report.leakage_status())}: pass a gallery of real-person embeddings (--gallery) to check it</p>"
    if report.leakage is not None:
        flagged = [
            f"{f.identity_id}: cos {f.cosine:.4f} to {f.gallery_id}" for f in report.leakage.flagged
        ]
        leakage = f"<h2>Leakage</h2>{_key_values({'gallery': report.leakage.gallery, 'gallery_size': report.leakage.gallery_size, 'max_cosine': report.leakage.max_cosine})}{_list(flagged[:100], 'warning')}"
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Audit report</title>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>Audit {verdict}</h1><p><code>{html.escape(report.uri)}</code> - {html.escape(report.created_at)}</p>"
        f"<h2>Summary</h2>{_key_values(report.summary())}"
        f"<h2>Problems</h2>{_list(report.problems, 'problem')}"
        f"<h2>Warnings</h2>{_list(report.warnings, 'warning')}"
        f"<h2>Plots</h2><div class='plots'>{plot_html}</div>"
        f"<h2>Coverage</h2>{_coverage(report)}"
        f"{composition_html(report, plots.intra_class)}"
        f"{leakage}{_contact_sheet(reader, plots)}"
        "</body></html>"
    )
