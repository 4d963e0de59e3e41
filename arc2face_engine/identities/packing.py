"""Identity packing: spread N identity embeddings apart on the hypersphere near the face manifold.

After HyperFace (Idiap, ICLR 2025): identities start at (noisy copies of) points of a
gallery of face embeddings, the stand-in for the manifold of real-looking faces, and
projected gradient steps on the unit sphere minimise, per identity i,

    separation(i) = tau * log(1 + sum_j exp((cos(x_i, x_j) - target) / tau))
    manifold(i)   = weight * (1 - max_g cos(x_i, g))

over its nearest identities j and nearest gallery points g. The separation term is a
soft maximum of the nearest-neighbour cosines that vanishes once they are all below
`separation_target`, so the manifold term then pulls identities back towards real faces
until their neighbours are at the target: the target sets how far apart identities end
up, the weight how hard they are kept near the gallery.

Scale: the N x N similarity matrix is never built. Neighbour lists are searched every
`refresh_every` steps: exactly (all pairs in blocks of the upper triangle) up to
`exact_rows` identities or when everything fits in `probes` cells of `cell_rows`; above
that in an inverted-file fashion: identities are grouped into cells by spherical k-means
and each searches the cells of its `probes` nearest centroids, and the last search is
exact, so the closest pairs, which make the minimum angle, are pushed apart in the final
steps. Steps then only touch each identity's k listed neighbours, in anchor chunks of
`batch_size`, so memory is O(N * 512 + batch_size * (k + KEY_BLOCK) floats). Every step
updates all identities from the previous positions (a Jacobi step), so the result depends
on the seed and the options, not on timing; on CPU torch runs on one thread
(determinism.CPU_THREADS) so reruns give identical bytes on any machine.

More identities than gallery rows: rows are shared, and identities that share one start
about `separation_target` apart rather than as near-copies (_start_noise).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from arc2face_engine.determinism import pinned_cpu_threads
from arc2face_engine.identities.neighbours import max_cosine, merge_top_k
from arc2face_engine.identities.sources import build_identities_table
from schemas.tables import EMBEDDING_DIM

# Mixed into the job seed so packing draws never coincide with other uses of the same seed.
PACKING_STREAM = 0x9AC4
KMEANS_ITERATIONS = 4
# Floor of the starting cosine between identities that share a gallery row (_start_noise):
# below it the start would be almost uniform noise, nowhere near the row.
MIN_SIBLING_COSINE = 0.05
# Keys compared per block in a neighbour search: a block is batch_size x KEY_BLOCK floats.
KEY_BLOCK = 4096


@dataclass(frozen=True)
class PackingOptions:
    separation_target: float = 0.2  # cosine the optimiser pushes neighbour pairs below
    manifold_weight: float = 0.5  # pull towards the nearest gallery point
    steps: int = 100
    learning_rate: float = 0.05  # step length (radians, roughly) at the start; cosine decay
    temperature: float = 0.02  # softness of the soft maximum over neighbour cosines
    neighbours: int = 8  # identities each identity is pushed away from
    gallery_neighbours: int = 4  # gallery candidates for the nearest manifold point
    refresh_every: int = 10  # steps between neighbour searches (stale lists let pairs close in)
    # start = normalise(gallery row + init_noise * unit noise) while every identity has a row
    # of its own; when rows are shared the noise grows (see _start_noise).
    init_noise: float = 0.75
    batch_size: int = 4096  # anchors per chunk (bounds memory)
    # Every search is exact (all pairs, in blocks) up to this many identities: 5 TFLOP per
    # search at 100k, about 150 s on one CPU core. Above it, an inverted-file search, which
    # misses some close pairs: at 100k with 4 probed cells the minimum angle was 5.6 degrees
    # lower than with exact searches (BENCHMARKS.md).
    exact_rows: int = 131_072
    cell_rows: int = 4096  # identities per search cell in the inverted-file search
    probes: int = 8  # cells each identity searches
    # The last search is exact (all pairs, in blocks): a cell search misses some pairs that
    # straddle cells, and the closest pair is what the minimum angle is made of.
    exact_final_search: bool = True


@dataclass
class _Lists:
    neighbours: torch.Tensor  # (N, k) identity indices
    neighbour_ok: torch.Tensor  # (N, k) bool: slot holds a real neighbour
    gallery: torch.Tensor  # (N, kg) gallery indices
    gallery_ok: torch.Tensor


def pack_identities(
    count: int,
    gallery: np.ndarray,
    seed: int,
    options: PackingOptions = PackingOptions(),
    device: str | torch.device = "cpu",
    progress: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(count x 512 unit float32 embeddings, gallery row each identity started from).

    `gallery`: (M, 512) unit rows. `progress(step, steps)` is called after each step.
    """
    if count <= 0:
        raise ValueError(f"count must be > 0, got {count}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(_stream_seed(seed))
    keys = torch.tensor(np.asarray(gallery, dtype=np.float32), device=device)  # a writable copy
    start_rows = _start_rows(count, len(keys), generator)
    noise = torch.randn(count, EMBEDDING_DIM, generator=generator) / math.sqrt(EMBEDDING_DIM)
    spread = _start_noise(count, len(keys), options)
    points = _unit(keys[start_rows.to(device)] + spread * noise.to(device))
    lists: _Lists | None = None
    with pinned_cpu_threads(device):
        for step in range(options.steps):
            if step % options.refresh_every == 0:
                final = step + options.refresh_every >= options.steps
                lists = _search(points, keys, options, generator, final)
            points = _step(points, keys, lists, options, _learning_rate(step, options))
            if progress is not None:
                progress(step + 1, options.steps)
    return points.cpu().numpy(), start_rows.numpy()


def sample_packed(
    count: int,
    gallery: np.ndarray,
    seed: int,
    options: PackingOptions = PackingOptions(),
    device: str | torch.device = "cpu",
) -> pa.Table:
    """`pack_identities` as an IDENTITIES_SCHEMA table (source "packed")."""
    embeddings, start_rows = pack_identities(count, gallery, seed, options, device)
    provenance = [f"packed seed={seed} start=gallery row {int(row)}" for row in start_rows]
    return build_identities_table(embeddings, "packed", provenance)


def _stream_seed(seed: int) -> int:
    return int(np.random.SeedSequence([seed, PACKING_STREAM]).generate_state(1, np.uint64)[0] >> 1)


def _start_rows(count: int, gallery_rows: int, generator: torch.Generator) -> torch.Tensor:
    """Distinct gallery rows while the gallery lasts, then another permutation, and so on."""
    rounds = -(-count // gallery_rows)
    rows = [torch.randperm(gallery_rows, generator=generator) for _ in range(rounds)]
    return torch.cat(rows)[:count]


def _start_noise(count: int, gallery_rows: int, options: PackingOptions) -> float:
    """Noise scale s of the starting points normalise(row + s * unit noise).

    Two identities started from the same row have cosine about 1 / (1 + s^2): 0.64 at the
    default 0.75, fine while every identity has a row of its own. With more identities than
    rows, those siblings would start as near-copies, and a few dozen steps against the
    manifold pull do not separate them (at 100k identities on a 10k gallery the closest pair
    stayed at cosine 0.52). So shared rows start their identities about the separation target
    apart, 1 / (1 + s^2) = target, and the manifold term pulls them in from there.
    """
    if count <= gallery_rows:
        return options.init_noise
    target = max(options.separation_target, MIN_SIBLING_COSINE)
    return max(options.init_noise, math.sqrt(1.0 / target - 1.0))


def _unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)


def _learning_rate(step: int, options: PackingOptions) -> float:
    """Cosine decay to a tenth: long strides first, then settle."""
    progress = step / max(options.steps - 1, 1)
    return options.learning_rate * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


# --- one projected gradient step ------------------------------------------------------------


def _step(
    points: torch.Tensor, keys: torch.Tensor, lists: _Lists, options: PackingOptions, rate: float
) -> torch.Tensor:
    moved = torch.empty_like(points)
    for start in range(0, len(points), options.batch_size):
        stop = start + options.batch_size
        anchors = points[start:stop]
        gradient = _separation_gradient(
            anchors, _rows(points, lists.neighbours[start:stop]), lists.neighbour_ok[start:stop],
            options,
        ) - options.manifold_weight * _nearest(
            anchors, _rows(keys, lists.gallery[start:stop]), lists.gallery_ok[start:stop]
        )
        # Project onto the tangent plane, step, and go back to the sphere.
        tangent = gradient - (gradient * anchors).sum(dim=1, keepdim=True) * anchors
        moved[start:stop] = _unit(anchors - rate * tangent)
    return moved


def _rows(matrix: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """matrix[index] for a 2-D index (index_select is the faster gather on CPU)."""
    return matrix.index_select(0, index.flatten()).view(*index.shape, matrix.shape[1])


def _separation_gradient(
    anchors: torch.Tensor, neighbours: torch.Tensor, ok: torch.Tensor, options: PackingOptions
) -> torch.Tensor:
    """d separation / d anchor = sum_j p_j x_j, p = softmax over (0, (cos_j - target) / tau)."""
    cosines = torch.bmm(neighbours, anchors[:, :, None])[:, :, 0]
    logits = ((cosines - options.separation_target) / options.temperature).masked_fill(
        ~ok, -torch.inf
    )
    with_zero = torch.cat([torch.zeros_like(logits[:, :1]), logits], dim=1)
    weights = torch.softmax(with_zero, dim=1)[:, 1:]
    return torch.bmm(weights[:, None, :], neighbours)[:, 0]


def _nearest(anchors: torch.Tensor, candidates: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """The candidate gallery point closest to each anchor (zero where there is none)."""
    cosines = torch.bmm(candidates, anchors[:, :, None])[:, :, 0].masked_fill(~ok, -torch.inf)
    best = cosines.argmax(dim=1)
    nearest = candidates[torch.arange(len(anchors), device=anchors.device), best]
    return nearest * ok.any(dim=1, keepdim=True)


# --- neighbour search -----------------------------------------------------------------------


def _search(
    points: torch.Tensor,
    keys: torch.Tensor,
    options: PackingOptions,
    generator: torch.Generator,
    final: bool,
) -> _Lists:
    """Top-k identity neighbours (self excluded) and top-k gallery candidates per identity."""
    count = len(points)
    cells = -(-count // options.cell_rows)
    exact = (
        count <= options.exact_rows
        or cells <= options.probes
        or (final and options.exact_final_search)
    )
    if exact:  # all pairs (also when every cell would be searched anyway)
        probe = torch.zeros((count, 1), dtype=torch.long, device=points.device)
        key_home = torch.zeros(len(keys), dtype=torch.long, device=points.device)
    else:
        centroids = _spherical_kmeans(points, cells, generator)
        probe = _top_cells(points, centroids, options.probes)
        key_home = _top_cells(keys, centroids, 1)[:, 0]
    k = min(options.neighbours, count - 1)
    kg = min(options.gallery_neighbours, len(keys))
    if exact:
        neighbours, neighbour_values = _exact_neighbours(points, k, options.batch_size)
    else:
        neighbours, neighbour_values = _without_self(
            *_search_cells(points, points, probe[:, 0], probe, k + 1, options)
        )
    gallery, gallery_values = _search_cells(points, keys, key_home, probe, kg, options)
    return _Lists(neighbours, neighbour_values > -torch.inf, gallery, gallery_values > -torch.inf)


def _spherical_kmeans(
    points: torch.Tensor, cells: int, generator: torch.Generator
) -> torch.Tensor:
    """Cell centroids: k-means on the sphere from `cells` seeded distinct starting rows."""
    start = torch.randperm(len(points), generator=generator)[:cells].to(points.device)
    centroids = points[start].clone()
    for _ in range(KMEANS_ITERATIONS):
        assignment = max_cosine(points, centroids)[1]
        sums = torch.zeros_like(centroids).index_add_(0, assignment, points)
        empty = sums.norm(dim=1) == 0
        centroids = torch.where(empty[:, None], centroids, _unit(sums))
    return centroids


def _top_cells(rows: torch.Tensor, centroids: torch.Tensor, probes: int) -> torch.Tensor:
    chunks = [
        torch.topk(rows[start : start + 65_536] @ centroids.T, probes, dim=1).indices
        for start in range(0, len(rows), 65_536)
    ]
    return torch.cat(chunks)


def _search_cells(
    queries: torch.Tensor,
    keys: torch.Tensor,
    key_home: torch.Tensor,
    probe: torch.Tensor,
    k: int,
    options: PackingOptions,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query: the k keys of largest cosine among the keys homed in its probed cells."""
    device = queries.device
    best = torch.full((len(queries), k), -torch.inf, device=device)
    best_index = torch.zeros((len(queries), k), dtype=torch.long, device=device)
    if k == 0:
        return best_index, best
    for cell in torch.unique(probe).tolist():
        members = torch.nonzero(key_home == cell).flatten()
        askers = torch.nonzero((probe == cell).any(dim=1)).flatten()
        for key_start in range(0, len(members), KEY_BLOCK):
            block = members[key_start : key_start + KEY_BLOCK]
            for start in range(0, len(askers), options.batch_size):
                rows = askers[start : start + options.batch_size]
                cosines = queries[rows] @ keys[block].T
                values, index = torch.topk(cosines, min(k, len(block)), dim=1)
                best[rows], best_index[rows] = merge_top_k(
                    best[rows], best_index[rows], values, block[index], k
                )
    return best_index, best


def _without_self(index: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop each row's own entry from its k+1 nearest (its home cell is always searched, so
    it is there; if a tie pushed it out, drop the last entry instead)."""
    rows = torch.arange(len(index), device=index.device)[:, None]
    own = index == rows
    own[:, -1] |= ~own.any(dim=1)
    keep = ~own
    width = index.shape[1] - 1
    return index[keep].view(-1, width), values[keep].view(-1, width)



def _exact_neighbours(
    points: torch.Tensor, k: int, rows: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k neighbours (self excluded) over all pairs, each block of the upper
    triangle computed once and used for both of its row ranges."""
    count = len(points)
    best = torch.full((count, k), -torch.inf, device=points.device)
    best_index = torch.zeros((count, k), dtype=torch.long, device=points.device)
    if k == 0:
        return best_index, best
    for start in range(0, count, rows):
        stop = min(start + rows, count)
        for other in range(start, count, rows):
            other_stop = min(other + rows, count)
            cosines = points[start:stop] @ points[other:other_stop].T
            if other == start:
                cosines.fill_diagonal_(-torch.inf)
            _merge_block(best, best_index, cosines, start, other, k)
            if other != start:
                _merge_block(best, best_index, cosines.T, other, start, k)
    return best_index, best


def _merge_block(
    best: torch.Tensor,
    best_index: torch.Tensor,
    cosines: torch.Tensor,
    row_start: int,
    column_start: int,
    k: int,
) -> None:
    values, index = torch.topk(cosines, min(k, cosines.shape[1]), dim=1)
    stop = row_start + len(cosines)
    best[row_start:stop], best_index[row_start:stop] = merge_top_k(
        best[row_start:stop], best_index[row_start:stop], values, index + column_start, k
    )
