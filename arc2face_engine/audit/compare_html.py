"""Render a CompareReport as one self-contained HTML page: the metrics side by side, the
plots overlaid (one colour per dataset), the overlap of each pair with contact sheets of
its closest pairs."""

from __future__ import annotations

import html

import matplotlib

matplotlib.use("Agg")  # no display on workers; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

from arc2face_engine.audit.compare_report import CONTACT_PAIRS, CompareReport, DatasetComparison
from arc2face_engine.audit.html import CSS, _fmt, _img, _png, _thumbnail
from arc2face_engine.audit.report import Histogram
from arc2face_engine.dataset.reader import DatasetReader


def _label(index: int, entry: DatasetComparison) -> str:
    return f"{index + 1}: {entry.name or entry.uri}"


def _metrics(entry: DatasetComparison) -> dict[str, object]:
    quality, integrity = entry.audit.quality, entry.audit.integrity
    per = entry.images_per_identity
    rate = None
    if quality is not None and quality.accepted_images + quality.rejected_images:
        rate = quality.accepted_images / (quality.accepted_images + quality.rejected_images)
    norms = quality.feature_norm_accepted if quality is not None else None
    return {
        "origin": entry.origin,
        "audit passed": entry.audit.passed,
        "problems": len(entry.audit.problems),
        "images (rows)": integrity.rows,
        "accepted images": quality.accepted_images if quality else None,
        "accept rate": rate,
        "identities": quality.identities if quality else None,
        "identities with an accepted image": quality.identities_with_accepted if quality else None,
        "images per identity (mean)": per.mean,
        "images per identity (median)": per.median,
        "images per identity (min / max)": f"{per.min} / {per.max}" if per.identities else None,
        "uniqueness": quality.uniqueness if quality else None,
        "intra-class consistency": quality.intra_class_consistency if quality else None,
        "intra-class min cosine": quality.intra_class_min_cosine if quality else None,
        "inter-class max cosine": quality.inter_class_max_cosine if quality else None,
        "inter-class close pairs": quality.inter_class_close_pairs if quality else None,
        "near-duplicate pairs": quality.near_duplicates.count if quality else None,
        "feature norm (median, accepted)": norms.median if norms else None,
        "pose names": len(quality.pose_coverage) if quality else None,
        "expression names": len(quality.expression_coverage) if quality else None,
    }


def _side_by_side(report: CompareReport) -> str:
    rows = [_metrics(entry) for entry in report.datasets]
    head = "".join(
        f"<th>{html.escape(_label(i, entry))}</th>" for i, entry in enumerate(report.datasets)
    )
    body = "".join(
        f"<tr><th>{html.escape(key)}</th>"
        + "".join(f"<td>{html.escape(_fmt(row[key]))}</td>" for row in rows)
        + "</tr>"
        for key in rows[0]
    )
    return f"<table><tr><th>metric</th>{head}</tr>{body}</table>"


def _overlaid(report: CompareReport, title: str, xlabel: str, pick) -> str | None:
    """One plot, each dataset's histogram as a density outline."""
    figure, ax = plt.subplots(figsize=(5, 3.2))
    drawn = False
    for index, entry in enumerate(report.datasets):
        histogram: Histogram | None = pick(entry)
        if histogram is None or not sum(histogram.counts):
            continue
        counts = np.asarray(histogram.counts, float)
        ax.stairs(counts / counts.sum(), np.asarray(histogram.edges), label=_label(index, entry))
        drawn = True
    if not drawn:
        plt.close(figure)
        return None
    ax.set(title=title, xlabel=xlabel, ylabel="share")
    ax.legend(fontsize=7)
    return _png(figure)


def _plots(report: CompareReport) -> str:
    def quality(name: str):
        return lambda entry: getattr(entry.audit.quality, name, None)

    def norms(entry):
        stats = getattr(entry.audit.quality, "feature_norm_accepted", None)
        return stats.histogram if stats is not None else None

    specs = [
        ("similarity to identity (accepted)", "cosine", quality("similarity_accepted")),
        ("inter-class cosine (identity centres)", "cosine", quality("inter_class_histogram")),
        ("ArcFace feature norm (accepted)", "norm", norms),
        ("measured yaw (accepted)", "degrees", lambda entry: entry.measured_yaw),
        ("measured pitch (accepted)", "degrees", lambda entry: entry.measured_pitch),
        ("accepted images per identity", "images", lambda e: e.images_per_identity.histogram),
    ]
    images = [(_overlaid(report, title, xlabel, pick), title) for title, xlabel, pick in specs]
    return "".join(_img(data, alt=alt) for data, alt in images if data)


def _counts(coverage: dict) -> str:
    return ", ".join(f"{key} {count.accepted}/{count.total}" for key, count in sorted(coverage.items()))


def _coverage(report: CompareReport) -> str:
    parts = []
    for title, name in (("Poses", "pose_coverage"), ("Expressions", "expression_coverage")):
        rows = "".join(
            f"<tr><td>{html.escape(_label(i, entry))}</td><td>"
            + html.escape(_counts(getattr(entry.audit.quality, name, None) or {}))
            + "</td></tr>"
            for i, entry in enumerate(report.datasets)
        )
        parts.append(f"<h3>{title} (accepted/total)</h3><table>{rows}</table>")
    return "".join(parts)


def _sheet(reader: DatasetReader, paths: list[str]) -> str:
    return "".join(_thumbnail(reader, path) for path in paths) or "(no image)"


def _overlaps(
    report: CompareReport, readers: list[DatasetReader], contacts: list[dict[str, list[str]]]
) -> str:
    parts = []
    for found in report.overlaps:
        first, second = report.datasets[found.first], report.datasets[found.second]
        title = f"{_label(found.first, first)} ~ {_label(found.second, second)}"
        summary = (
            f"<p>{found.pair_count} identity pairs within cosine {found.threshold:.2f}: "
            f"{found.first_within} of {found.first_identities} identities of the first, "
            f"{found.second_within} of {found.second_identities} of the second; max cosine "
            f"{_fmt(found.max_cosine)}.</p>"
        )
        rows = "".join(
            f"<tr><td>{pair.cosine:.4f}</td><td><code>{html.escape(pair.first_id)}</code><br>"
            f"{_sheet(readers[found.first], contacts[found.first].get(pair.first_id, []))}</td>"
            f"<td><code>{html.escape(pair.second_id)}</code><br>"
            f"{_sheet(readers[found.second], contacts[found.second].get(pair.second_id, []))}</td></tr>"
            for pair in found.pairs[:CONTACT_PAIRS]
        )
        table = (
            "<table class='sheet'><tr><th>cosine</th><th>first</th><th>second</th></tr>"
            f"{rows}</table>" if rows else ""
        )
        parts.append(f"<h3>{html.escape(title)}</h3>{summary}{table}")
    return "".join(parts)


def render_compare_html(
    report: CompareReport, readers: list[DatasetReader], contacts: list[dict[str, list[str]]]
) -> str:
    """The whole page; thumbnails are read through each dataset's reader (paths checked)."""
    datasets = "".join(
        f"<li>{html.escape(_label(i, entry))}: <code>{html.escape(entry.uri)}</code></li>"
        for i, entry in enumerate(report.datasets)
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>Dataset comparison</title>"
        f"<style>{CSS}</style></head><body>"
        f"<h1>Dataset comparison</h1><p>{html.escape(report.created_at)}; radius "
        f"{report.radius:g} (cosine distance)</p><ol style='list-style:none'>{datasets}</ol>"
        f"<h2>Metrics</h2>{_side_by_side(report)}"
        f"<h2>Plots</h2><div class='plots'>{_plots(report)}</div>"
        f"<h2>Coverage</h2>{_coverage(report)}"
        f"<h2>Identity overlap between datasets</h2>{_overlaps(report, readers, contacts)}"
        "</body></html>"
    )
