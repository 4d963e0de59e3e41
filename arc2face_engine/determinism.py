"""Reproducibility: per-image seeds and pinned CPU threads.

Every image's seed is a pure function of (job seed, identity, variant, attempt), so a
re-run, a different shard size or a different batch size reproduces the same images.

Stability guarantee: `image_seed` is part of the dataset format (the manifest stores the
seed and re-runs must regenerate committed images bit-for-bit). Its definition, BLAKE2b
with an 8-byte digest over the four integers packed as little-endian signed 64-bit values,
top bit cleared, never changes between versions; changing it would be a new function.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# A fixed key separates these seeds from any other BLAKE2b use of the same integers.
_PERSON = b"a2f-image-seed"


def image_seed(job_seed: int, identity_index: int, variant_index: int, attempt: int) -> int:
    """The generator seed of one image, in [0, 2**63) (valid for torch.Generator.manual_seed
    and for an int64 Parquet column)."""
    values = (job_seed, identity_index, variant_index, attempt)
    names = ("job_seed", "identity_index", "variant_index", "attempt")
    for name, value in zip(names, values, strict=True):
        if not _INT64_MIN <= int(value) <= _INT64_MAX:
            raise ValueError(f"{name}={value} does not fit in 64 bits")
    digest = hashlib.blake2b(
        struct.pack("<4q", *(int(value) for value in values)), digest_size=8, person=_PERSON
    ).digest()
    return int.from_bytes(digest, "little") & _INT64_MAX


# torch intra-op threads on CPU while identities are searched or packed: the thread split
# changes the last bit of reductions, and identity sets must be the same on every machine
# (as images are: generation pins CPU generation with the same context manager).
CPU_THREADS = 1


@contextmanager
def pinned_cpu_threads(device: torch.device) -> Iterator[None]:
    """Run with CPU_THREADS intra-op threads on CPU (GPUs keep their defaults)."""
    import torch  # here: seeds alone must not import torch

    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
