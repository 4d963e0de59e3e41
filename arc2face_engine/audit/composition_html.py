"""The composition and fairness part of the HTML report: share bars against the targets,
per-group bars of how each group is served, the per-identity difficulty, and the tables."""

from __future__ import annotations

import base64
import html
import io

import matplotlib

matplotlib.use("Agg")  # no display on workers; must precede pyplot
import matplotlib.pyplot as plt
import numpy as np

from arc2face_engine.audit.report import AuditReport, AxisComposition, CompositionSection
from schemas.tables import GENDERS, SKIN_TONES, age_band_names

TITLES = {"gender": "predicted gender", "age": "predicted age band", "skin_tone": "skin tone (ITA)"}
GROUP_METRICS = (
    ("accept_rate", "accept rate"),
    ("mean_similarity", "mean similarity to identity"),
    ("intra_class_cosine", "intra-class cosine"),
    ("nearest_other_identity", "nearest other identity"),
)
NOTE = (
    "Predictions (gender, age: antelopev2's genderage.onnx) and a measurement (skin tone: "
    "Individual Typology Angle of the cheeks) on synthetic images; no ethnicity or race is "
    "inferred. Identities are grouped by identities.parquet's attributes, images by their own."
)


def _png(figure) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(figure)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="composition plot" src="data:image/png;base64,{data}">'


def _shares_plot(axis: AxisComposition, order: list[str]) -> str:
    shown = {*axis.identity_shares, *axis.image_shares, *(axis.targets or {})}
    names = [name for name in order if name in shown]
    if not names:
        return ""
    figure, ax = plt.subplots(figsize=(5, 3.2))
    x = np.arange(len(names))
    series = [("identities", axis.identity_shares), ("accepted images", axis.image_shares)]
    if axis.targets is not None:
        series.append(("target", axis.targets))
    width = 0.8 / len(series)
    for offset, (label, shares) in enumerate(series):
        ax.bar(x + offset * width, [shares.get(n, 0.0) for n in names], width, label=label)
    ax.set_xticks(x + width * (len(series) - 1) / 2, names, rotation=20)
    ax.set(title=f"shares: {TITLES[axis.axis]}", ylabel="share", ylim=(0, 1.05))
    ax.legend()
    return _png(figure)


def _groups_plot(axis: AxisComposition) -> str:
    if not axis.groups:
        return ""
    figure, axes = plt.subplots(1, len(GROUP_METRICS), figsize=(11, 2.6))
    names = [group.group for group in axis.groups]
    for ax, (metric, title) in zip(axes, GROUP_METRICS, strict=True):
        values = [getattr(group, metric) for group in axis.groups]
        ax.bar(names, [np.nan if v is None else v for v in values])
        ax.set_title(title, fontsize=9)
        ax.tick_params(axis="x", labelrotation=30, labelsize=7)
    figure.suptitle(f"per group: {TITLES[axis.axis]}", fontsize=10, y=1.06)
    return _png(figure)


def _difficulty_plot(section: CompositionSection, values: np.ndarray) -> str:
    values = values[np.isfinite(values)]
    if not len(values):
        return ""
    figure, ax = plt.subplots(figsize=(5, 3.2))
    ax.hist(values, bins=np.linspace(-1, 1, 41))
    ax.set(title="intra-class cosine per identity", xlabel="mean pairwise cosine of its faces",
           ylabel="identities")  # fmt: skip
    return _png(figure)


def _cell(value) -> str:
    if value is None:
        return ""
    return f"{value:.3f}" if isinstance(value, float) else html.escape(str(value))


def _group_table(axis: AxisComposition) -> str:
    header = "<tr><th>group</th><th>identities</th><th>identity share</th><th>target</th>" \
             "<th>image share</th><th>accept rate</th><th>mean similarity</th>" \
             "<th>intra-class cosine</th><th>nearest other identity</th><th>reject reasons</th></tr>"  # fmt: skip
    rows = []
    for group in axis.groups:
        target = (axis.targets or {}).get(group.group)
        reasons = ", ".join(f"{k} {v}" for k, v in group.reject_reasons.items())
        cells = [group.group, group.identities, axis.identity_shares.get(group.group), target,
                 axis.image_shares.get(group.group), group.accept_rate, group.mean_similarity,
                 group.intra_class_cosine, group.nearest_other_identity, reasons]  # fmt: skip
        rows.append("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in cells) + "</tr>")
    gaps = "; ".join(
        f"{g.metric} {g.gap:.3f} ({g.low} to {g.high}{'' if g.compared else ', small groups'})"
        for g in axis.gaps
    )
    return f"<table>{header}{''.join(rows)}</table><p>largest gaps: {html.escape(gaps or 'none compared')}</p>"


def composition_html(report: AuditReport, intra_class: np.ndarray | None = None) -> str:
    """The composition section of the page ('' when the audit has none)."""
    section = report.composition
    if section is None:
        return ""
    parts = [
        "<h2>Composition and fairness</h2>",
        f"<p>{html.escape(NOTE)} A gap between groups of at least "
        f"{section.min_group_identities} identities above {section.gap_threshold:g} is a "
        "warning.</p>",
    ]
    orders = {"gender": list(GENDERS), "age": age_band_names(section.age_edges),
              "skin_tone": list(SKIN_TONES)}  # fmt: skip
    for axis in section.axes:
        parts.append(f"<h3>{html.escape(TITLES[axis.axis])}</h3>")
        shares = _shares_plot(axis, orders[axis.axis])
        parts.append(f"<div class='plots'>{shares}</div>{_groups_plot(axis)}")
        parts.append(_group_table(axis))
        if axis.agreement is not None:
            parts.append(
                f"<p>identities whose accepted images agree with their recorded value: "
                f"{axis.agreement:.1%}</p>"
            )
    if section.placement is not None:
        placement = section.placement
        cells = "".join(
            f"<tr><td>{html.escape(cell)}</td><td>{kept}</td><td>{quota}</td></tr>"
            for cell, (kept, quota) in placement.cells.items()
        )
        parts.append(
            f"<h3>Balanced placement (probes)</h3><p>{placement.kept} kept of "
            f"{placement.candidates} candidates; quotas met: {placement.quotas_met}</p>"
            f"<table><tr><th>cell</th><th>kept</th><th>quota</th></tr>{cells}</table>"
        )
    difficulty = section.difficulty
    rows = "".join(
        f"<tr><td>{name}</td><td>{q.count}</td><td>{_cell(q.p10)}</td><td>{_cell(q.median)}</td>"
        f"<td>{_cell(q.p90)}</td></tr>"
        for name, q in (
            ("mean similarity to identity", difficulty.similarity_mean),
            ("lowest similarity to identity", difficulty.similarity_min),
            ("intra-class cosine", difficulty.intra_class_cosine),
            ("yaw spread (deg)", difficulty.yaw_spread),
            ("pitch spread (deg)", difficulty.pitch_spread),
            ("expression coverage", difficulty.expression_coverage),
        )
    )
    parts.append(
        "<h3>Intra-class difficulty and diversity (per identity)</h3>"
        "<table><tr><th>measure</th><th>identities</th><th>p10</th><th>median</th><th>p90</th></tr>"
        f"{rows}</table><p>every identity: audit/identities.parquet</p>"
    )
    if intra_class is not None:
        parts.append(_difficulty_plot(section, intra_class))
    return "".join(parts)
