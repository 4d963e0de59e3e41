"""The dataset card: README.md at the dataset root, with one plot, the composition table
and the per-identity difficulty and diversity."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np

from arc2face_engine.dataset.identity_stats import iter_identity_stats
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from schemas.tables import (
    DEFAULT_AGE_EDGES,
    GENDERS,
    SKIN_TONES,
    DatasetInfo,
    age_band_names,
    age_band_of,
)

SIMILARITY_PLOT = "card/similarity.png"

LIMITATIONS = """\
- Every image is synthetic: Arc2Face (Stable Diffusion 1.5 conditioned on an ArcFace
  embedding). Identities are points in ArcFace space, not real people, but a sampled
  point can fall close to a real person: run `arc2face-synth audit --gallery` against
  a gallery of real embeddings before release.
- Arc2Face generates one person per image, in the frontal hemisphere of poses.
- Acceptance uses the same ArcFace family that conditioned generation, so accepted
  images are biased towards what that model recognises; the model and its training
  data (WebFace42M, FFHQ, CelebA-HQ) carry demographic biases.
- Images generated with tiny random test models (the `demo` command) are noise and
  carry no identity signal.
- The composition columns are predictions (gender, age) and a measurement (skin tone)
  on synthetic images, with the errors and biases of the models that made them; they
  describe the images, not any real person.
"""

COMPOSITION_NOTE = """Gender and age are predicted by insightface's `genderage.onnx` (antelopev2 pack) on each
image's largest face; skin tone is measured, not predicted: the Individual Typology Angle
(ITA) of the cheeks of the aligned face, in six categories. These are predictions and
measurements on synthetic images, used to balance the identities (when the spec asks) and
to audit how each group is served. No ethnicity or race is inferred. Identities count
under identities.parquet's attributes (the probe image's when the identities were
balanced, else the majority / median over their accepted images); images under their own.
"""

MODEL_TERMS = """- insightface's antelopev2 pack (the SCRFD detector, the 3D landmarks and
  `genderage.onnx`, which made this dataset's gender and age columns) is released by
  insightface for non-commercial research only; those terms apply to the pack, and the
  predicted columns were made with it.
- Arc2Face and its `arcface.onnx`: see their model card (FoivosPar/Arc2Face).
"""



def _similarities(reader: DatasetReader) -> tuple[np.ndarray, np.ndarray]:
    values, accepted = [], []
    for batch in reader.iter_manifest(columns=["similarity", "accepted"]):
        values.append(batch.column("similarity").to_numpy(zero_copy_only=False))
        accepted.append(batch.column("accepted").to_numpy(zero_copy_only=False))
    if not values:
        return np.zeros(0), np.zeros(0, dtype=bool)
    return np.concatenate(values).astype(float), np.concatenate(accepted).astype(bool)


def _similarity_png(
    similarity: np.ndarray, accepted: np.ndarray, threshold: float | None
) -> bytes:
    # matplotlib loads here, when a card is drawn: a job's checks should not pay for it.
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 3.2), dpi=100)
    axis = figure.subplots()
    bins = np.linspace(-1, 1, 81)
    finite = ~np.isnan(similarity)
    axis.hist(similarity[finite & accepted], bins=bins, alpha=0.7, label="accepted")
    axis.hist(similarity[finite & ~accepted], bins=bins, alpha=0.7, label="rejected")
    if threshold is not None:
        axis.axvline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    axis.set_xlabel("cosine similarity to the identity")
    axis.set_ylabel("images")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _age_edges(spec: dict) -> list[float]:
    balance = (spec.get("identities") or {}).get("balance") or {}
    return list(balance.get("age_edges") or DEFAULT_AGE_EDGES)


def _targets(spec: dict, axis: str) -> dict[str, float]:
    balance = (spec.get("identities") or {}).get("balance") or {}
    if balance.get("joint"):
        summed: dict[str, float] = {}
        for cell in balance["joint"]:
            if cell.get(axis) is not None:
                summed[cell[axis]] = summed.get(cell[axis], 0.0) + cell["share"]
        return summed
    return dict(balance.get(axis) or {})


def composition_counts(reader: DatasetReader, edges: list[float]) -> dict[str, tuple[Counter, Counter]]:
    """axis -> (identities per value, accepted images per value)."""
    identities = reader.identities(columns=["gender", "age", "skin_tone"]).to_pylist()
    counts = {axis: (Counter(), Counter()) for axis in ("gender", "age", "skin_tone")}
    for row in identities:
        for axis, value in (("gender", row["gender"]), ("age", age_band_of(row["age"], edges)),
                            ("skin_tone", row["skin_tone"])):  # fmt: skip
            if value is not None:
                counts[axis][0][value] += 1
    columns = ["accepted", "predicted_gender", "predicted_age", "skin_tone"]
    for batch in reader.iter_manifest(columns=columns):
        for row in batch.to_pylist():
            if not row["accepted"]:
                continue
            values = (("gender", row["predicted_gender"]),
                      ("age", age_band_of(row["predicted_age"], edges)),
                      ("skin_tone", row["skin_tone"]))  # fmt: skip
            for axis, value in values:
                if value is not None:
                    counts[axis][1][value] += 1
    return counts


def _share(count: int, total: int) -> str:
    return f"{count / total:.1%}" if total else "-"


def composition_lines(info: DatasetInfo, counts: dict) -> list[str]:
    edges = _age_edges(info.spec)
    orders = {"gender": list(GENDERS), "age": age_band_names(edges), "skin_tone": list(SKIN_TONES)}
    lines = ["## Composition", "", COMPOSITION_NOTE,
             "| attribute | value | identities | share | target | accepted images | share |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for axis, order in orders.items():
        people, images = counts[axis]
        targets = _targets(info.spec, axis)
        for value in order:
            if not (people[value] or images[value] or value in targets):
                continue
            target = f"{targets[value]:.1%}" if value in targets else ""
            lines.append(
                f"| {axis} | {value} | {people[value]} | {_share(people[value], sum(people.values()))} "
                f"| {target} | {images[value]} | {_share(images[value], sum(images.values()))} |"
            )
    return [*lines, ""]


def _quantiles(values: list) -> str:
    present = np.asarray([v for v in values if v is not None], np.float64)
    if not len(present):
        return "| - | - | - |"
    p10, p50, p90 = np.percentile(present, [10, 50, 90])
    return f"| {p10:.3f} | {p50:.3f} | {p90:.3f} |"


def difficulty_lines(reader: DatasetReader) -> list[str]:
    """Per-identity difficulty and diversity over the accepted images, as quantiles."""
    stats = list(iter_identity_stats(reader))
    measures = [
        ("mean similarity to the identity", "similarity_mean"),
        ("lowest similarity to the identity", "similarity_min"),
        ("intra-class cosine (mean over pairs of its faces)", "intra_class_cosine"),
        ("measured yaw spread (std, degrees)", "yaw_spread"),
        ("measured pitch spread (std, degrees)", "pitch_spread"),
        ("expression coverage (share of its expressions accepted)", "expression_coverage"),
    ]
    lines = ["## Intra-class difficulty and diversity", "",
             f"Per identity, over its accepted images ({len(stats)} identities); "
             "`arc2face-synth audit` lists every identity in audit/identities.parquet.", "",
             "| per identity | p10 | median | p90 |", "|---|---|---|---|"]  # fmt: skip
    for title, name in measures:
        lines.append(f"| {title} " + _quantiles([getattr(s, name) for s in stats]))
    return [*lines, ""]


def render_card(
    info: DatasetInfo, has_plot: bool, composition: list[str] | None = None
) -> str:
    if info.imported is not None:
        return render_imported_card(info, has_plot, composition)
    spec = info.spec
    counts = info.counts
    generation = spec["generation"]
    filters = spec["filter"]
    variations = spec["variations"]
    accept_rate = counts.accepted / counts.images if counts.images else 0.0
    reasons = "\n".join(
        f"| {reason} | {count} |" for reason, count in sorted(counts.reject_reasons.items())
    )
    lines = [
        f"# {info.name}",
        "",
        "A synthetic face-recognition dataset made by arc2face-synth with Arc2Face.",
        "",
        f"Status: **{info.status}**. Spec hash: `{info.spec_hash}`.",
        "",
        "## How it was made",
        "",
        f"- identities: {spec['identities']['source']}, {counts.identities} kept",
        f"- images per identity: {variations['images_per_identity']}; poses: "
        f"{variations['poses']['kind']}; expressions: {variations['expressions']['kind']}",
        f"- generation: {generation['scheduler']}, {generation['steps']} steps, guidance "
        f"{generation['guidance']}, {generation['width']}x{generation['height']}",
        f"- filter: ArcFace re-verification, similarity >= {filters['min_similarity']}, "
        f"detection score >= {filters['min_det_score']}, exactly one face: "
        f"{filters['require_single_face']}, "
        f"feature norm >= {filters.get('min_feature_norm', 0.0)} (0 = off), "
        f"similarity <= {filters.get('max_similarity', 1.0)} (1 = off), "
        f"up to {filters['max_attempts']} attempts per image",
        "",
        "## Counts",
        "",
        "| what | count |",
        "|---|---|",
        f"| identities | {counts.identities} |",
        f"| shards committed | {counts.committed_shards} / {counts.shards} |",
        f"| images generated | {counts.images} |",
        f"| accepted | {counts.accepted} ({accept_rate:.1%}) |",
        f"| rejected | {counts.rejected} |",
        "",
        "| reject reason | images |",
        "|---|---|",
        reasons or "| (none) | 0 |",
        "",
    ]
    if has_plot:
        lines += [f"![similarity histogram]({SIMILARITY_PLOT})", ""]
    lines += composition or []
    lines += [
        "## Files",
        "",
        "- `dataset.json`: spec, versions, model file hashes, counts",
        "- `identities.parquet`: one row per identity (embedding, label, provenance)",
        "- `manifest/part-*.parquet`: one row per generated image, accepted or rejected",
        "- `images/<shard>/`: the image files",
        "",
        "## Limitations",
        "",
        LIMITATIONS,
        "## Model terms",
        "",
        MODEL_TERMS,
        "## Versions",
        "",
        "```json",
        json.dumps(info.versions, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return "\n".join(lines)


IMPORTED_LIMITATIONS = """\
- The images are the source's, copied byte for byte; what they show, who is in them and
  under which licence they may be used is the source's (see its own card).
- Identities are the source's labels: an identity's embedding is the normalised mean of
  its accepted images, so a mislabelled image shows as a low `similarity`.
- Identities without an accepted image are left out (their rows keep the reasons).
"""


def render_imported_card(
    info: DatasetInfo, has_plot: bool, composition: list[str] | None = None
) -> str:
    """The card of an imported dataset: where it came from and what was kept."""
    source, counts = info.imported, info.counts
    accept_rate = counts.accepted / counts.images if counts.images else 0.0
    reasons = "\n".join(
        f"| {reason} | {count} |" for reason, count in sorted(counts.reject_reasons.items())
    )
    lines = [
        f"# {info.name}",
        "",
        f"A face dataset imported by arc2face-synth from `{source.source_uri}` "
        f"({source.format}{', ' + source.layout if source.layout else ''}"
        f"{', aligned crops' if source.aligned else ''}).",
        "",
        f"Status: **{info.status}**. Spec hash: `{info.spec_hash}`.",
        "",
        "## Counts",
        "",
        "| what | count |",
        "|---|---|",
        f"| source items | {source.source_items} |",
        f"| source labels | {source.source_identities} |",
        f"| identities kept | {counts.identities} |",
        f"| identities left out (no accepted image) | {source.identities_left_out} |",
        f"| items without a label | {source.unlabelled} |",
        f"| shards committed | {counts.committed_shards} / {counts.shards} |",
        f"| accepted | {counts.accepted} ({accept_rate:.1%}) |",
        f"| rejected or refused | {counts.rejected} |",
        "",
        "| reason | images |",
        "|---|---|",
        reasons or "| (none) | 0 |",
        "",
    ]
    if has_plot:
        lines += [f"![similarity histogram]({SIMILARITY_PLOT})", ""]
    lines += composition or []
    lines += ["## Limitations", "", IMPORTED_LIMITATIONS, "## Versions", "", "```json",
              json.dumps(info.versions, indent=2, sort_keys=True), "```", ""]  # fmt: skip
    return "\n".join(lines)


def write_dataset_card(writer: DatasetWriter, info: DatasetInfo) -> None:
    reader = DatasetReader(writer.uri, writer.storage_options)
    similarity, accepted = _similarities(reader)
    has_plot = len(similarity) > 0
    if has_plot:
        threshold = None if info.imported is not None else info.spec["filter"]["min_similarity"]
        writer.write_bytes(SIMILARITY_PLOT, _similarity_png(similarity, accepted, threshold))
    edges = _age_edges(info.spec)
    composition = composition_lines(info, composition_counts(reader, edges))
    composition += difficulty_lines(reader)
    writer.write_bytes("README.md", render_card(info, has_plot, composition).encode())
