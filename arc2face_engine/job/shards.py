"""The streaming shard plan of a job: which identities form each shard, and which pose and
expression each wanted image gets; loads no model.

Nothing here materialises the (identity, variant) pairs of a job: shards are
yielded one at a time and variants are computed on demand, so planning a
10M-image job takes constant memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pyarrow as pa

# The shard arithmetic is part of the dataset format (layout); re-exported for the job.
from arc2face_engine.dataset.layout import identities_per_shard
from arc2face_engine.dataset.layout import shard_count as shard_count
from arc2face_engine.generation.settings import GenerationSettings
from schemas.job import FilterSpec, GenerationSpec, JobSpec, OutputSpec, VariationsSpec
from schemas.tables import EMBEDDING_DIM, vector_matrix


@dataclass(frozen=True)
class Variant:
    """The controls of one wanted image: its index within the identity, pose and expression."""

    index: int
    pose_index: int | None
    expression_index: int | None


def variant_for(
    identity_index: int,
    variant_index: int,
    n_poses: int,
    n_expressions: int,
    images_per_identity: int,
) -> Variant:
    """The grid cell of image `v` of identity `i`.

    Cell `c = (i*N + v) mod (P*E)` (N = images_per_identity); pose `c mod P`, expression
    `(c + c // L) mod E` with L = lcm(P, E). Consecutive variants change pose and
    expression at every step. Pose is `item mod P`, so an identity with N >= P sees every
    pose, counts within 1. When P and E are coprime, L = P*E and the expression is
    `item mod E`: with N >= E every expression, counts within 1 (15 poses x 8 expressions,
    40 images: 2-3 per pose, 5 per expression). Otherwise each block of L cells shifts
    the expressions by one, so counts may differ by 2. Within a block c -> (c mod P,
    c mod E) reaches the pairs agreeing mod gcd(P, E), and the shifts reach the rest, so
    c -> cell is a bijection: any P*E consecutive items in identity-major order cover the
    grid exactly once. P == 0: expression `c mod E`; E == 0: pose `c mod P`.
    """
    if images_per_identity <= 0:
        raise ValueError(f"images_per_identity must be > 0, got {images_per_identity}")
    item = identity_index * images_per_identity + variant_index
    if not n_poses and not n_expressions:
        return Variant(index=variant_index, pose_index=None, expression_index=None)
    if not n_poses:
        return Variant(index=variant_index, pose_index=None, expression_index=item % n_expressions)
    if not n_expressions:
        return Variant(index=variant_index, pose_index=item % n_poses, expression_index=None)
    cell = item % (n_poses * n_expressions)
    block = math.lcm(n_poses, n_expressions)
    return Variant(
        index=variant_index,
        pose_index=cell % n_poses,
        expression_index=(cell + cell // block) % n_expressions,
    )


@dataclass(frozen=True)
class ShardRange:
    """Identities [identity_start, identity_stop) form shard `shard`."""

    shard: int
    identity_start: int
    identity_stop: int

    @property
    def identity_count(self) -> int:
        return self.identity_stop - self.identity_start

    def items(self, images_per_identity: int) -> Iterator[tuple[int, int]]:
        """(identity_index, variant_index) of every wanted image, first attempts only."""
        for identity in range(self.identity_start, self.identity_stop):
            for variant in range(images_per_identity):
                yield identity, variant


def iter_shards(
    n_identities: int, images_per_identity: int, shard_size: int
) -> Iterator[ShardRange]:
    """Consecutive identities, `max(1, shard_size // images_per_identity)` per shard."""
    for name, value in (("images_per_identity", images_per_identity), ("shard_size", shard_size)):
        if value <= 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if n_identities < 0:
        raise ValueError(f"n_identities must be >= 0, got {n_identities}")
    step = identities_per_shard(images_per_identity, shard_size)
    for shard, start in enumerate(range(0, n_identities, step)):
        yield ShardRange(shard, start, min(start + step, n_identities))


def job_batch_sizes(
    n_identities: int, images_per_identity: int, shard_size: int, batch_size: int, max_attempts: int
) -> frozenset[int]:
    """Every batch size a job's shards can hand the engine. Shards generate in batches of
    `batch_size` and end with the remainder; with top-ups (max_attempts > 1) the rejected
    images of a batch join the queue, so the last batch can hold any number up to
    `batch_size`. A compiled engine warms up exactly the buckets these sizes meet."""
    if max_attempts > 1:
        return frozenset(range(1, batch_size + 1))
    sizes = set()
    for shard in iter_shards(n_identities, images_per_identity, shard_size):
        images = shard.identity_count * images_per_identity
        if images >= batch_size:
            sizes.add(batch_size)
        if images % batch_size:
            sizes.add(images % batch_size)
    return frozenset(sizes)


@dataclass(frozen=True)
class ShardIdentities:
    """The identities of one shard: global indices, ids, labels and embeddings."""

    indices: list[int]
    identity_ids: list[str]
    labels: list[int]
    embeddings: np.ndarray  # (n, 512) float32, L2-normalised


def shard_identities(table: pa.Table, start: int, stop: int) -> ShardIdentities:
    """Slice the identities table (rows [start, stop)) into what a shard needs."""
    part = table.slice(start, stop - start)
    return ShardIdentities(
        indices=list(range(start, stop)),
        identity_ids=part.column("identity_id").to_pylist(),
        labels=part.column("label").to_pylist(),
        embeddings=vector_matrix(part.column("embedding"), EMBEDDING_DIM),
    )


@dataclass(frozen=True)
class ShardWork:
    """One shard's work, independent of the worker's models: its identities and the spec
    sections that decide its images (sampling, controls, filter, image format)."""

    range: ShardRange
    identities: ShardIdentities
    seed: int
    variations: VariationsSpec
    generation: GenerationSpec
    filter: FilterSpec
    output: OutputSpec
    # The writer lease this shard runs under: its writer checks the lease before it deletes
    # leftovers or commits (see dataset/lease.py).
    lease_token: str | None = None
    # Every batch size any shard of the job can meet (job_batch_sizes): what a compiled
    # engine warms up before the job's first shard.
    job_batch_sizes: frozenset[int] = frozenset()

    @cached_property
    def settings(self) -> GenerationSettings:
        return GenerationSettings.from_spec(self.generation)


def shard_works(
    spec: JobSpec, identities_table: pa.Table, lease_token: str | None = None
) -> Iterator[ShardWork]:
    """Every shard's work, in order, streamed (one ShardIdentities slice at a time)."""
    sizes = job_batch_sizes(
        len(identities_table), spec.variations.images_per_identity, spec.output.shard_size,
        spec.generation.batch_size, spec.filter.max_attempts,
    )  # fmt: skip
    for shard in iter_shards(
        len(identities_table), spec.variations.images_per_identity, spec.output.shard_size
    ):
        yield ShardWork(
            range=shard,
            identities=shard_identities(
                identities_table, shard.identity_start, shard.identity_stop
            ),
            seed=spec.seed,
            variations=spec.variations,
            generation=spec.generation,
            filter=spec.filter,
            output=spec.output,
            lease_token=lease_token,
            job_batch_sizes=sizes,
        )
