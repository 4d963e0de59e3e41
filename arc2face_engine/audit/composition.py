"""Composition and fairness: who is in the dataset and how well each group is served.

Attributes are predictions (gender, age: genderage.onnx) and a measurement (skin tone:
ITA) on synthetic images; no ethnicity or race is inferred. Images count under their own
values (accepted images only); identities under identities.parquet's attributes (the
probe's when the job balanced them, else over their accepted images), or, where those are
missing, under their accepted images' values computed here.

Per group (each value of gender, age band, ITA category): identities, images, accept rate,
reject reasons, mean similarity of accepted images to their identity, intra-class cosine
(mean over the group's identities) and nearest other identity (mean of each identity's
largest centre cosine to another identity). For every metric the largest gap between
groups is reported, and between groups of at least `min_group_identities` identities a
gap above the threshold is a warning. When the spec balanced the identities, the shares are compared
with its targets and probes/manifest.parquet is checked against the quotas.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from arc2face_engine.audit.identities import Identities
from arc2face_engine.audit.report import (
    AxisComposition,
    CompositionSection,
    DifficultySection,
    GroupGap,
    GroupStats,
    IdentityDifficulty,
    PlacementCheck,
    Quantiles,
)
from arc2face_engine.audit.schema import iter_part_batches
from arc2face_engine.dataset import layout
from arc2face_engine.dataset.identity_stats import STATS_COLUMNS, IdentityStats, part_identity_stats
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.identities.balance import CellFiller, attribute_values, describe
from schemas.job import BALANCE_AXES, BalanceSpec
from schemas.tables import (
    AUDIT_IDENTITIES_SCHEMA,
    DEFAULT_AGE_EDGES,
    GENDERS,
    SKIN_TONES,
    age_band_names,
    age_band_of,
    skin_tone_of,
)

DEFAULT_GAP_THRESHOLD = 0.1
MIN_GROUP_IDENTITIES = 10  # smaller groups are listed but not compared: too noisy
GAP_METRICS = ("accept_rate", "mean_similarity", "intra_class_cosine", "nearest_other_identity")
MOST_UNIFORM_LISTED = 20
AUDIT_IDENTITIES = f"{layout.AUDIT_DIR}/identities.parquet"


@dataclass
class _Group:
    """Sums of one group, turned into GroupStats at the end."""

    identities: int = 0
    images: int = 0
    accepted: int = 0
    reasons: Counter = field(default_factory=Counter)
    similarity_sum: float = 0.0
    similarity_count: int = 0
    consistency: list[float] = field(default_factory=list)
    nearest: list[float] = field(default_factory=list)

    def add(self, stats: IdentityStats, nearest: float) -> None:
        self.identities += 1
        self.images += stats.images
        self.accepted += stats.accepted
        self.reasons.update(stats.reject_reasons)
        if stats.similarity_mean is not None:
            self.similarity_sum += stats.similarity_mean * stats.accepted
            self.similarity_count += stats.accepted
        if stats.intra_class_cosine is not None:
            self.consistency.append(stats.intra_class_cosine)
        if np.isfinite(nearest):
            self.nearest.append(float(nearest))

    def stats(self, name: str) -> GroupStats:
        return GroupStats(
            group=name,
            identities=self.identities,
            images=self.images,
            accepted=self.accepted,
            accept_rate=self.accepted / self.images if self.images else None,
            reject_reasons=dict(sorted(self.reasons.items())),
            mean_similarity=(
                self.similarity_sum / self.similarity_count if self.similarity_count else None
            ),
            intra_class_cosine=float(np.mean(self.consistency)) if self.consistency else None,
            nearest_other_identity=float(np.mean(self.nearest)) if self.nearest else None,
        )


def _axis_orders(age_edges: list[float]) -> dict[str, list[str]]:
    return {"gender": list(GENDERS), "age": age_band_names(age_edges), "skin_tone": list(SKIN_TONES)}


def _balance(raw: dict | None) -> BalanceSpec | None:
    try:
        balance = raw["spec"]["identities"]["balance"]
        return BalanceSpec.model_validate(balance) if balance else None
    except (KeyError, TypeError, ValueError):
        return None


def _recorded_attributes(reader: DatasetReader, identities: Identities) -> list[dict]:
    columns = ["gender", "age", "skin_ita"]
    try:
        table = reader.identities(columns=columns)
    except (KeyError, pa.ArrowException, OSError):
        return [{} for _ in range(len(identities))]
    return table.to_pylist()


def _values(attributes, age_edges: list[float]) -> dict[str, str | None]:
    if attributes is None:
        return dict.fromkeys(BALANCE_AXES)
    return attribute_values(attributes.gender, attributes.age, attributes.skin_ita, age_edges)


@dataclass
class _Tally:
    """Everything the pass collects."""

    age_edges: list[float]
    orders: dict[str, list[str]]
    image_counts: dict[str, Counter] = field(default_factory=dict)
    images_without: Counter = field(default_factory=Counter)
    groups: dict[str, dict[str, _Group]] = field(default_factory=dict)
    identities_without: Counter = field(default_factory=Counter)
    agree: Counter = field(default_factory=Counter)
    compared: Counter = field(default_factory=Counter)
    rows: list[dict] = field(default_factory=list)

    def count_images(self, table: pa.Table) -> None:
        accepted = table.filter(table.column("accepted"))
        genders = accepted.column("predicted_gender").to_pylist()
        ages = accepted.column("predicted_age").to_pylist()
        itas = accepted.column("skin_ita").to_pylist()
        for gender, age, ita in zip(genders, ages, itas, strict=True):
            values = {"gender": gender, "age": age_band_of(age, self.age_edges),
                      "skin_tone": skin_tone_of(ita)}  # fmt: skip
            for axis, value in values.items():
                if value is None:
                    self.images_without[axis] += 1
                else:
                    self.image_counts.setdefault(axis, Counter())[value] += 1

    def add_identity(self, stats: IdentityStats, recorded: dict, nearest: float) -> None:
        measured = _values(stats.attributes, self.age_edges)
        values = attribute_values(
            recorded.get("gender"), recorded.get("age"), recorded.get("skin_ita"), self.age_edges
        )
        for axis in BALANCE_AXES:
            value = values[axis] if values[axis] is not None else measured[axis]
            if values[axis] is not None and measured[axis] is not None:
                self.compared[axis] += 1
                self.agree[axis] += int(values[axis] == measured[axis])
            if value is None:
                self.identities_without[axis] += 1
                continue
            values[axis] = value
            self.groups.setdefault(axis, {}).setdefault(value, _Group()).add(stats, nearest)
        self.rows.append(_identity_row(stats, values, nearest))


def _identity_row(stats: IdentityStats, values: dict, nearest: float) -> dict:
    row = {name: getattr(stats, name, None) for name in AUDIT_IDENTITIES_SCHEMA.names}
    row.update(values)
    row["nearest_other_identity"] = float(nearest) if np.isfinite(nearest) else None
    return row


def _shares(counts: dict[str, int], order: list[str]) -> tuple[dict[str, int], dict[str, float]]:
    total = sum(counts.values())
    ordered = {name: counts.get(name, 0) for name in order if counts.get(name, 0)}
    return ordered, {name: count / total for name, count in ordered.items()} if total else {}


def _targets(balance: BalanceSpec | None, axis: str) -> dict[str, float] | None:
    if balance is None or axis not in balance.axes():
        return None
    if balance.joint is None:
        return dict(getattr(balance, axis))
    summed: dict[str, float] = {}
    for cell in balance.joint:
        value = getattr(cell, axis)
        summed[value] = summed.get(value, 0.0) + cell.share
    return summed


def _gaps(groups: list[GroupStats], minimum: int) -> list[GroupGap]:
    """The largest gap of each metric: between the groups large enough to compare when
    there are two of them, else between all groups (reported, never a warning)."""
    gaps = []
    for metric in GAP_METRICS:
        valued = [g for g in groups if getattr(g, metric) is not None]
        large = [g for g in valued if g.identities >= minimum]
        compared = len(large) >= 2
        chosen = large if compared else valued
        if len(chosen) < 2:
            continue
        low = min(chosen, key=lambda g: getattr(g, metric))
        high = max(chosen, key=lambda g: getattr(g, metric))
        gap = getattr(high, metric) - getattr(low, metric)
        gaps.append(GroupGap(metric=metric, gap=gap, low=low.group, high=high.group,
                             compared=compared))  # fmt: skip
    return gaps


def _axis(tally: _Tally, axis: str, balance: BalanceSpec | None, minimum: int) -> AxisComposition:
    order = tally.orders[axis]
    image_counts, image_shares = _shares(tally.image_counts.get(axis, {}), order)
    groups = tally.groups.get(axis, {})
    identity_counts, identity_shares = _shares(
        {name: group.identities for name, group in groups.items()}, order
    )
    section = AxisComposition(
        axis=axis, image_counts=image_counts, image_shares=image_shares,
        images_without_value=tally.images_without[axis], identity_counts=identity_counts,
        identity_shares=identity_shares, identities_without_value=tally.identities_without[axis],
    )  # fmt: skip
    if tally.compared[axis]:
        section.agreement = tally.agree[axis] / tally.compared[axis]
    targets = _targets(balance, axis)
    if targets is not None:
        section.targets = targets
        names = [name for name in order if name in targets or name in identity_shares]
        section.deviations = {n: identity_shares.get(n, 0.0) - targets.get(n, 0.0) for n in names}
        section.max_abs_deviation = max((abs(v) for v in section.deviations.values()), default=0.0)
    section.groups = [groups[name].stats(name) for name in order if name in groups]
    section.gaps = _gaps(section.groups, minimum)
    return section


def _quantiles(values: list[float | None]) -> Quantiles:
    present = np.asarray([v for v in values if v is not None], np.float64)
    if not len(present):
        return Quantiles()
    p10, p50, p90 = np.percentile(present, [10, 50, 90]).tolist()
    return Quantiles(count=len(present), p10=p10, median=p50, p90=p90)


def _difficulty(rows: list[dict]) -> DifficultySection:
    section = DifficultySection(identities=len(rows))
    for name in ("similarity_mean", "similarity_min", "intra_class_cosine", "yaw_spread",
                 "pitch_spread", "expression_coverage"):  # fmt: skip
        setattr(section, name, _quantiles([row[name] for row in rows]))
    ranked = sorted((row for row in rows if row["intra_class_cosine"] is not None),
                    key=lambda row: -row["intra_class_cosine"])  # fmt: skip
    keys = [f.name for f in fields(IdentityStats) if f.name in IdentityDifficulty.model_fields]
    section.most_uniform = [
        IdentityDifficulty(**{key: row[key] for key in keys}) for row in ranked[:MOST_UNIFORM_LISTED]
    ]
    return section


def _read_part(reader: DatasetReader, part: str) -> pa.Table:
    batches = list(iter_part_batches(reader, part, STATS_COLUMNS))
    return pa.Table.from_batches(batches) if batches else pa.table({})


def measure_composition(
    reader: DatasetReader,
    parts: list[str],
    identities: Identities,
    nearest_other: np.ndarray,
    raw: dict | None,
    gap_threshold: float = DEFAULT_GAP_THRESHOLD,
    min_group_identities: int = MIN_GROUP_IDENTITIES,
) -> tuple[CompositionSection, pa.Table]:
    """The composition section and the per-identity table (audit/identities.parquet)."""
    balance = _balance(raw)
    age_edges = list(balance.age_edges) if balance else list(DEFAULT_AGE_EDGES)
    tally = _Tally(age_edges, _axis_orders(age_edges))
    recorded = _recorded_attributes(reader, identities)
    for part in parts:
        table = _read_part(reader, part)
        if not table.num_rows:
            continue
        tally.count_images(table)
        found = list(part_identity_stats(table))
        rows = identities.index_of(pa.array([stats.identity_id for stats in found], pa.string()))
        for stats, index in zip(found, rows.tolist(), strict=True):
            if index < 0:
                continue  # unknown identities are an integrity finding already
            nearest = nearest_other[index] if index < len(nearest_other) else np.nan
            tally.add_identity(stats, recorded[index], nearest)
    section = CompositionSection(
        age_edges=age_edges, gap_threshold=gap_threshold, min_group_identities=min_group_identities
    )
    section.axes = [_axis(tally, axis, balance, min_group_identities) for axis in BALANCE_AXES]
    section.difficulty = _difficulty(tally.rows)
    if balance is not None:
        section.placement = check_placement(reader, raw, balance, len(identities))
    table = pa.Table.from_pylist(tally.rows, schema=AUDIT_IDENTITIES_SCHEMA)
    return section, table


def composition_warnings(section: CompositionSection) -> list[str]:
    """Gaps above the threshold, and a placement that does not hold."""
    warnings = []
    for axis in section.axes:
        for gap in axis.gaps:
            if gap.compared and gap.gap > section.gap_threshold:
                warnings.append(
                    f"composition: {gap.metric} differs by {gap.gap:.3f} between {axis.axis} "
                    f"groups ({gap.low} lowest, {gap.high} highest), above the gap threshold "
                    f"{section.gap_threshold:g}"
                )
    if section.placement is not None:
        warnings.extend(f"composition: probes: {p}" for p in section.placement.problems)
    return warnings


# --- a balanced job's placement ----------------------------------------------------------------


def check_placement(
    reader: DatasetReader, raw: dict | None, balance: BalanceSpec, identities: int
) -> PlacementCheck:
    """probes/manifest.parquet against its recorded checksum and the spec's quotas: every
    kept probe's cell follows from its attributes, and the kept identities per cell equal
    the quotas."""
    check = PlacementCheck()
    if not reader.exists(layout.PROBES_MANIFEST):
        check.problems.append(f"{layout.PROBES_MANIFEST} is missing")
        return check
    data = reader.fs.cat_file(reader.path(layout.PROBES_MANIFEST))
    recorded = (raw or {}).get("probes_sha256")
    if recorded != hashlib.sha256(data).hexdigest():
        check.problems.append(f"{layout.PROBES_MANIFEST} does not match its recorded sha256")
    table = pq.read_table(pa.BufferReader(data))
    filler = CellFiller.for_spec(balance, identities)
    check.candidates = table.num_rows
    for row in table.to_pylist():
        if row["outcome"] != "kept":
            continue
        check.kept += 1
        cell = filler.cell_of(attribute_values(
            row["predicted_gender"], row["predicted_age"], row["skin_ita"], balance.age_edges
        ))  # fmt: skip
        if cell is None or describe(cell) != row["cell"]:
            check.problems.append(
                f"candidate {row['candidate']} is kept in cell {row['cell']} but its attributes "
                f"place it in {describe(cell) if cell else 'no cell'}"
            )
            continue
        filler.take(cell)
    for cell, quota in filler.quotas.items():
        check.cells[describe(cell)] = [filler.taken.get(cell, 0), quota]
    check.quotas_met = all(taken == quota for taken, quota in check.cells.values())
    if not check.quotas_met:
        check.problems.append("the kept probes do not meet the quotas exactly")
    if check.kept != identities:
        check.problems.append(f"{check.kept} kept probes for {identities} identities")
    return check
