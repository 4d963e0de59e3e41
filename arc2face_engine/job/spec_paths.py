"""The local files and folders a spec names, checked before anything else looks at them.

A path that does not exist is one line naming the spec key, the path and, when the path
is relative, the folder it was resolved against (the working folder: the one the command
runs in, or a deployment run's working folder, which is rarely the one the user meant).
The flow adds what to do in a deployment run (it knows it is one; this module does not).

Only existence is checked here, and only for local paths: what a file holds, and every
URI, is checked by the code that reads it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from arc2face_engine.faces.pack import SMALL_IMAGE
from schemas.errors import (
    BankError,
    EmbeddingFileError,
    ModelFileMissing,
    SpecError,
    UserError,
    resolved_against,
)
from schemas.job import JobSpec


@dataclass(frozen=True)
class SpecPath:
    """One path the spec names: its dotted key, its value, the error a missing one raises
    and the fix that message gives."""

    key: str
    path: str
    error: type[UserError]
    fix: str


def is_tiny_spec(spec: JobSpec) -> bool:
    """Whether the spec makes images of the tiny stand-in models' size: both sides under
    faces.pack.SMALL_IMAGE pixels, the size below which images are detected at their own
    size (`models tiny`, the demo and the tests use 64 to 128)."""
    return max(spec.generation.height, spec.generation.width) < SMALL_IMAGE


def _models_fix(spec: JobSpec) -> str:
    folder = spec.models.dir
    fix = f"run `arc2face-synth models download {folder}` for the real weights"
    if is_tiny_spec(spec):
        size = f"{spec.generation.width}x{spec.generation.height}"
        fix += (
            f", or `arc2face-synth models tiny {folder}` for tiny stand-in models (this "
            f"spec's {size} images are under {SMALL_IMAGE} pixels, a tiny-model size)"
        )
    return f"{fix}; or set models.dir to the folder that holds them"


def spec_paths(spec: JobSpec) -> list[SpecPath]:
    """Every path the spec uses, with its key: the models folder, the identity source and
    galleries, the pose and expression banks."""
    identities, variations = spec.identities, spec.variations
    found = [SpecPath("models.dir", spec.models.dir, ModelFileMissing, _models_fix(spec))]
    if identities.source == "file":
        fix = "set identities.path to a .parquet/.npy of N x 512 embeddings"
        found.append(SpecPath("identities.path", identities.path, EmbeddingFileError, fix))
    if identities.source == "images":
        fix = "set identities.path to a folder of photos"
        found.append(SpecPath("identities.path", identities.path, SpecError, fix))
    galleries = [("identities.exclusion.gallery", identities.exclusion.gallery)]
    if identities.source == "packed":
        galleries.append(("identities.packing.gallery", identities.packing.gallery))
    for key, gallery in galleries:
        if gallery:
            fix = f"set {key} to a .parquet/.npy of embeddings"
            found.append(SpecPath(key, gallery, EmbeddingFileError, fix))
    poses = variations.poses
    if poses.kind == "folder":
        fix = "set it to a folder of normal maps (`arc2face-synth banks poses DIR` makes one)"
        found.append(SpecPath("variations.poses.path", poses.path, BankError, fix))
    if poses.kind == "mesh":
        fix = "set it to an .obj/.ply head mesh"
        found.append(SpecPath("variations.poses.path", poses.path, BankError, fix))
    expressions = variations.expressions
    if expressions.kind == "file":
        fix = "set it to a .parquet/.npy/.yaml (`arc2face-synth banks expressions FILE` makes one)"
        found.append(SpecPath("variations.expressions.path", expressions.path, BankError, fix))
    return found


def _local(path: str) -> str | None:
    """The local filesystem path of `path`, or None for a URI of another filesystem."""
    if path.startswith("file://"):
        return path.removeprefix("file://")
    return None if "://" in path else path


def check_spec_paths(spec: JobSpec) -> None:
    """Raise the path's error for the first local path of the spec that does not exist.
    The error's `resolved_against` names the working folder when the path is relative."""
    for item in spec_paths(spec):
        local = _local(item.path)
        if local is None or os.path.exists(local):
            continue
        folder = resolved_against(item.path)
        where = f" (resolved against {folder})" if folder else ""
        error = item.error(f"{item.key} {item.path} does not exist{where}: {item.fix}")
        error.resolved_against = folder
        raise error
