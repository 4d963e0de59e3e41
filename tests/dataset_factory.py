"""Build small but valid datasets on disk (or any fsspec URI) for tests.

`make_dataset` writes through `DatasetWriter`, so the result has exactly the
layout and schemas a real generation job produces: real JPEG files with their
sha256 and sizes, identities.parquet, one manifest part per shard, dataset.json
with correct counts, some rejected rows with reasons, face embeddings clustered
around each identity embedding and keypoints inside the image.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from insightface.utils.face_align import arcface_dst
from PIL import Image

from arc2face_engine.dataset import layout
from arc2face_engine.dataset.writer import DatasetWriter
from schemas.tables import (
    EXPRESSION_DIM,
    IDENTITIES_SCHEMA,
    IDENTITY_ATTRIBUTE_COLUMNS,
    MANIFEST_SCHEMA,
    REJECT_REASONS,
    DatasetCounts,
    DatasetInfo,
    skin_tone_of,
)

# insightface's 112x112 ArcFace template (eyes, nose, mouth corners), scaled per image size.
ARCFACE_TEMPLATE_112 = arcface_dst.astype(np.float32)
POSES = (("frontal", 0.0), ("left", -30.0), ("right", 30.0))
EXPRESSIONS = ("neutral", "smile")

# (identity_index, variant, rng) -> face embedding for an accepted image (or None: default)
FaceEmbeddingFn = Callable[[int, int, np.random.Generator], np.ndarray | None]
# identity_index -> (predicted gender, predicted age, skin ITA) of its images with a face
AttributesFn = Callable[[int], tuple[str, float, float]]


@dataclass
class MadeDataset:
    """What `make_dataset` wrote, so tests can compare the audit/exports against it."""

    uri: str
    identity_ids: list[str]
    identity_embeddings: np.ndarray
    accepted: int = 0
    rejected: int = 0
    shards: int = 0
    reject_reasons: dict[str, int] = field(default_factory=dict)
    image_paths: list[str] = field(default_factory=list)

    @property
    def images(self) -> int:
        return self.accepted + self.rejected


def normalise(vectors: np.ndarray) -> np.ndarray:
    vectors = np.asarray(vectors, dtype=np.float32)
    return vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)


def jpeg_bytes(pixels: np.ndarray, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def face_like_image(size: int, identity_index: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB image with a per-identity tint, a bright oval and noise (distinct bytes per image)."""
    hue = np.array([(identity_index * 67) % 256, (identity_index * 131) % 256, 160], np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    oval = (((xx - 0.5) / 0.3) ** 2 + ((yy - 0.55) / 0.4) ** 2) < 1.0
    pixels = np.broadcast_to(hue, (size, size, 3)).copy()
    pixels[oval] = pixels[oval] * 0.5 + 110
    pixels += rng.normal(0, 12, size=pixels.shape)
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_dataset(
    root: str,
    n_identities: int = 4,
    images_per_identity: int = 5,
    shards: int = 2,
    seed: int = 0,
    *,
    reject_every: int = 4,
    image_size: int = 64,
    face_noise: float = 0.4,
    identity_embeddings: np.ndarray | None = None,
    face_embedding_fn: FaceEmbeddingFn | None = None,
    keep_rejected_images: bool = True,
    storage_options: dict | None = None,
    attributes_fn: AttributesFn | None = None,
) -> MadeDataset:
    """Write a complete dataset at `root` (a path or fsspec URI) and describe it.

    Every `reject_every`-th image (counting over the whole dataset) is rejected
    with a reason cycling through REJECT_REASONS and topped up by an accepted
    retry (attempt + 1), so each identity ends with `images_per_identity`
    accepted images. Accepted face embeddings are
    normalise(identity + face_noise * N(0, I/512)) unless `face_embedding_fn` says otherwise.
    `attributes_fn` gives every image with a face of an identity its composition columns
    (null without it).
    """
    rng = np.random.default_rng(seed)
    if identity_embeddings is None:
        identity_embeddings = rng.standard_normal((n_identities, 512))
    identity_embeddings = normalise(identity_embeddings)
    n_identities = len(identity_embeddings)
    identity_ids = [f"id-{index:06d}" for index in range(n_identities)]
    writer = DatasetWriter(root, storage_options)
    writer.write_identities(_identities_table(identity_ids, identity_embeddings, seed))

    made = MadeDataset(
        uri=str(root), identity_ids=identity_ids, identity_embeddings=identity_embeddings
    )
    counter = 0
    shard_members = np.array_split(np.arange(n_identities), shards)
    for shard, members in enumerate(shard_members):
        rows = []
        for identity_index in members.tolist():
            for variant in range(images_per_identity):
                attempt = 0
                while True:
                    counter += 1
                    reason = None
                    if reject_every and counter % reject_every == 0 and attempt == 0:
                        reason = REJECT_REASONS[(counter // reject_every) % len(REJECT_REASONS)]
                    row = _row(
                        made, writer, shard, identity_index, variant, attempt, reason,
                        image_size, face_noise, face_embedding_fn, keep_rejected_images, rng,
                    )  # fmt: skip
                    if attributes_fn is not None and row["face_count"]:
                        row.update(_attributes(*attributes_fn(identity_index)))
                    rows.append(row)
                    if reason is None:
                        break
                    attempt += 1
        rows.sort(key=lambda row: row["image_id"])
        writer.commit_shard(shard, pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA))
        _ensure_checksum(writer, layout.manifest_part(shard))
    made.shards = len(shard_members)
    writer.write_dataset_json(_info(made, n_identities))
    _ensure_identities_sha256(writer)
    return made


def rewrite_part(path, table: pa.Table) -> None:
    """Replace a local manifest part and its checksum sidecar, as a (buggy) writer would."""
    import pyarrow.parquet as pq

    pq.write_table(table, path)
    with open(path, "rb") as handle:
        digest = hashlib.sha256(handle.read()).hexdigest()
    with open(f"{path}.sha256", "w") as handle:
        handle.write(digest + "\n")


def _sha256(writer: DatasetWriter, relative: str) -> str:
    return hashlib.sha256(writer.fs.cat_file(writer.path(relative))).hexdigest()


def _ensure_checksum(writer: DatasetWriter, part: str) -> None:
    """The part's sha256 sidecar (CONTRACTS.md), unless the writer already recorded it."""
    sidecar = f"{part}.sha256"
    if not writer.fs.exists(writer.path(sidecar)):
        writer.write_bytes(sidecar, (_sha256(writer, part) + "\n").encode())


def _ensure_identities_sha256(writer: DatasetWriter) -> None:
    """dataset.json's identities_sha256 (CONTRACTS.md), unless the writer already recorded it."""
    info = json.loads(writer.fs.cat_file(writer.path(layout.DATASET_JSON)))
    if info.get("identities_sha256") is None:
        info["identities_sha256"] = _sha256(writer, layout.IDENTITIES)
        writer.write_bytes(layout.DATASET_JSON, json.dumps(info, indent=2).encode())


def _identities_table(identity_ids: list[str], embeddings: np.ndarray, seed: int) -> pa.Table:
    return pa.Table.from_pydict(
        {
            "identity_id": identity_ids,
            "label": list(range(len(identity_ids))),
            "embedding": [vector.tolist() for vector in embeddings],
            "source": ["random"] * len(identity_ids),
            "provenance": [f"seed={seed} candidate={index}" for index in range(len(identity_ids))],
            **{name: [None] * len(identity_ids) for name in IDENTITY_ATTRIBUTE_COLUMNS},
        },
        schema=IDENTITIES_SCHEMA,
    )


def _face_embedding(
    made: MadeDataset,
    identity_index: int,
    variant: int,
    reason: str | None,
    face_noise: float,
    face_embedding_fn: FaceEmbeddingFn | None,
    rng: np.random.Generator,
) -> np.ndarray | None:
    centre = made.identity_embeddings[identity_index]
    if reason == "no_face":
        return None
    if reason in ("low_similarity", "multiple_faces"):
        return normalise(rng.standard_normal(512))  # someone else
    if face_embedding_fn is not None:
        custom = face_embedding_fn(identity_index, variant, rng)
        if custom is not None:
            return normalise(custom)
    noise = rng.standard_normal(512) / np.sqrt(512)
    return normalise(centre + face_noise * noise)


def _row(
    made: MadeDataset,
    writer: DatasetWriter,
    shard: int,
    identity_index: int,
    variant: int,
    attempt: int,
    reason: str | None,
    image_size: int,
    face_noise: float,
    face_embedding_fn: FaceEmbeddingFn | None,
    keep_rejected_images: bool,
    rng: np.random.Generator,
) -> dict:
    identity_id = made.identity_ids[identity_index]
    image_id = f"{identity_id}-v{variant:04d}-a{attempt:02d}"
    accepted = reason is None
    embedding = _face_embedding(
        made, identity_index, variant, reason, face_noise, face_embedding_fn, rng
    )
    has_face = embedding is not None
    pose_name, pose_yaw = POSES[(variant + identity_index) % len(POSES)]
    expression_name = EXPRESSIONS[(variant + identity_index) % len(EXPRESSIONS)]
    expression = np.zeros(EXPRESSION_DIM, np.float32)
    if expression_name == "smile":
        expression[:5] = 0.5
    keypoints = ARCFACE_TEMPLATE_112 * (image_size / 112.0) + rng.normal(0, 0.5, (5, 2))
    similarity = float(embedding @ made.identity_embeddings[identity_index]) if has_face else None

    path = sha256 = size = None
    if accepted or keep_rejected_images:
        pixels = face_like_image(image_size, identity_index, rng)
        path, sha256, size = writer.write_image(shard, image_id, jpeg_bytes(pixels), "jpg")
        made.image_paths.append(path)
    if accepted:
        made.accepted += 1
    else:
        made.rejected += 1
        made.reject_reasons[reason] = made.reject_reasons.get(reason, 0) + 1
    return {
        "image_id": image_id,
        "identity_id": identity_id,
        "label": identity_index,
        "shard": shard,
        "variant": variant,
        "attempt": attempt,
        "seed": int(rng.integers(0, 2**62)),
        "path": path,
        "sha256": sha256,
        "size_bytes": size,
        "width": image_size,
        "height": image_size,
        "pose_name": pose_name,
        "pose_yaw": pose_yaw,
        "pose_pitch": 0.0,
        "pose_roll": 0.0,
        "expression_name": expression_name,
        "expression": expression.tolist(),
        "scheduler": "dpmsolver++",
        "steps": 25,
        "guidance": 3.0,
        "controlnet_scale": 1.0,
        "expression_scale": 1.0,
        "face_count": 0 if not has_face else (2 if reason == "multiple_faces" else 1),
        "det_score": None if not has_face else (0.3 if reason == "low_detection_score" else 0.9),
        "bbox": None if not has_face else [8.0, 8.0, image_size - 8.0, image_size - 4.0],
        "keypoints": None if not has_face else keypoints.astype(np.float32).ravel().tolist(),
        "measured_yaw": None if not has_face else pose_yaw + float(rng.normal(0, 3)),
        "measured_pitch": None if not has_face else float(rng.normal(0, 2)),
        "measured_roll": None if not has_face else float(rng.normal(0, 1)),
        "face_embedding": None if embedding is None else embedding.tolist(),
        "similarity": similarity,
        "accepted": accepted,
        "reject_reason": reason,
        "source": "generated",
    }


def _attributes(gender: str, age: float, ita: float) -> dict:
    return {"predicted_gender": gender, "gender_probability": 0.9, "predicted_age": age,
            "skin_ita": ita, "skin_tone": skin_tone_of(ita)}  # fmt: skip


def _info(made: MadeDataset, n_identities: int) -> DatasetInfo:
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    return DatasetInfo(
        name="factory",
        status="complete",
        spec={"name": "factory"},
        spec_hash="factory",
        counts=DatasetCounts(
            identities=n_identities,
            shards=made.shards,
            committed_shards=made.shards,
            images=made.images,
            accepted=made.accepted,
            rejected=made.rejected,
            reject_reasons=dict(made.reject_reasons),
        ),
        created_at=now,
        finished_at=now,
    )
