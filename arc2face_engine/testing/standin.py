"""A stand-in image generator and face verifier: no model, real images, real verdicts.

For driving the real flow, task runner, Prefect server and dataset writer at scale
(bench/bench_orchestration.py) and under faults (tests/test_cluster_faults.py) without
the cost of diffusion. Injected through the worker seam of `job/workers.py`:

    ARC2FACE_MODEL_FACTORY=arc2face_engine.testing.standin:standin_models

in the environment of every process that runs shards (the flow process with the local
task runner; each Dask worker). The spec still names a models directory: preflight
checks its files as usual (a tiny one, `write_tiny_models`, is enough); the stand-in
never loads it.

Deterministic: an image's pixels depend only on its request's seed and identity, so a
re-run (on any worker) writes the same bytes. The verifier judges the stored pixels
(decoded from the file, as the real one does): a pixel-derived hash decides the face's
detection score, its embedding noise and whether it is a bad draw (similarity near 0,
so `filter.min_similarity` rejects it and the shard tops it up). About one image in
five is a bad draw.

`ARC2FACE_STANDIN_SECONDS_PER_IMAGE` (default 0) makes generation take that long per
image, like a GPU would, so a fault can land in the middle of a shard.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Sequence

import numpy as np

from arc2face_engine.faces.records import AnalyzerBase, FaceRecord, rgb_frames
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from schemas.job import JobSpec
from schemas.tables import EMBEDDING_DIM, l2_normalize

SECONDS_PER_IMAGE_ENV = "ARC2FACE_STANDIN_SECONDS_PER_IMAGE"
BAD_DRAW_EVERY = 5  # about one image in this many is a bad draw


class StandInGenerator:
    """Noise images, one per request: a per-identity tint plus seeded noise."""

    def __init__(self, height: int, width: int, seconds_per_image: float = 0.0) -> None:
        self.height, self.width = height, width
        self.seconds_per_image = seconds_per_image

    def generate(
        self, requests: Sequence[ImageRequest], settings: GenerationSettings
    ) -> np.ndarray:
        images = np.empty((len(requests), self.height, self.width, 3), np.uint8)
        for image, request in zip(images, requests, strict=True):
            rng = np.random.default_rng(request.seed)
            tint = (np.abs(np.asarray(request.embedding[:3], np.float64)) * 400) % 160
            noise = rng.integers(0, 96, size=image.shape)
            image[:] = (noise + tint).astype(np.uint8)
        if self.seconds_per_image:
            time.sleep(self.seconds_per_image * len(requests))
        return images


def _pixel_seed(frame: np.ndarray) -> int:
    """A seed from the pixels themselves: what the verifier sees decides the verdict."""
    return int.from_bytes(hashlib.blake2b(frame.tobytes(), digest_size=8).digest(), "little")


class StandInVerifier(AnalyzerBase):
    """One 'face' per image, its embedding the identity's plus pixel-seeded noise."""

    def analyze(self, images: np.ndarray | Sequence[np.ndarray]) -> list[FaceRecord]:
        return [self._record(frame, None) for frame in rgb_frames(images)]

    def records_for(
        self, images: np.ndarray | Sequence[np.ndarray], identities: np.ndarray
    ) -> list[FaceRecord]:
        return [
            self._record(frame, identity)
            for frame, identity in zip(rgb_frames(images), identities, strict=True)
        ]

    def _record(self, frame: np.ndarray, identity: np.ndarray | None) -> FaceRecord:
        seed = _pixel_seed(frame)
        rng = np.random.default_rng(seed)
        noise = rng.standard_normal(EMBEDDING_DIM).astype(np.float32)
        bad = seed % BAD_DRAW_EVERY == 0
        if identity is None or bad:
            embedding = l2_normalize(noise)
        else:
            embedding = l2_normalize(l2_normalize(identity) + 0.03 * noise)
        height, width = frame.shape[:2]
        box = np.array([0.2 * width, 0.2 * height, 0.8 * width, 0.8 * height], np.float32)
        centre = np.array([0.5 * width, 0.5 * height], np.float32)
        keypoints = centre + np.array(
            [[-0.15, -0.1], [0.15, -0.1], [0.0, 0.05], [-0.1, 0.18], [0.1, 0.18]], np.float32
        ) * np.array([width, height], np.float32)
        return FaceRecord(
            face_count=1,
            det_score=float(0.6 + 0.39 * rng.random()),
            bbox=box,
            keypoints=keypoints.astype(np.float32),
            embedding=embedding,
            pose=(float(rng.normal(0, 10)), float(rng.normal(0, 5)), float(rng.normal(0, 3))),
            embedding_norm=float(18 + 6 * rng.random()),
        )


def standin_models(spec: JobSpec, device: str) -> tuple[StandInGenerator, StandInVerifier]:
    """The factory `ARC2FACE_MODEL_FACTORY` names (see the module docstring)."""
    seconds = float(os.environ.get(SECONDS_PER_IMAGE_ENV, "0") or 0)
    generator = StandInGenerator(spec.generation.height, spec.generation.width, seconds)
    return generator, StandInVerifier()
