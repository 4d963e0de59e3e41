"""The dataset card: README.md at the dataset root, with one plot."""

from __future__ import annotations

import io
import json

import numpy as np

from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.dataset.writer import DatasetWriter
from schemas.tables import DatasetInfo

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


def render_card(info: DatasetInfo, has_plot: bool) -> str:
    if info.imported is not None:
        return render_imported_card(info, has_plot)
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


def render_imported_card(info: DatasetInfo, has_plot: bool) -> str:
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
    writer.write_bytes("README.md", render_card(info, has_plot).encode())
