"""What `arc2face-synth plan` prints: identity, image and shard counts, output size and
a GPU-time estimate from a throughput (or a measured throughput table); loads no model."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import fsspec

from arc2face_engine import models_dir
from arc2face_engine.job.shards import identities_per_shard, shard_count
from schemas.errors import ModelFileMissing, SpecError
from schemas.job import DPM_GUIDANCE, LCM_GUIDANCE, PROBE_STEPS, JobSpec

# Measured generation throughput, images/s per GPU, keyed by (scheduler, steps, height, width).
# Add entries only from real runs (e.g. a bench script's JSON via load_throughput_table);
# no measurement of the full-size models exists yet, so the table starts empty and the
# plan says so instead of guessing.
MEASURED_THROUGHPUT: dict[tuple[str, int, int, int], dict[str, Any]] = {}



def load_throughput_table(
    uri: str, storage_options: dict[str, Any] | None = None
) -> dict[tuple[str, int, int, int], dict[str, Any]]:
    """Read measurements: a JSON list of {scheduler, steps, height, width, images_per_s,
    device, source} records (e.g. written by a benchmark run)."""
    fs, path = fsspec.core.url_to_fs(uri, **(storage_options or {}))
    with fs.open(path, "rb") as handle:
        records = json.load(handle)
    return {
        (r["scheduler"], int(r["steps"]), int(r["height"]), int(r["width"])): r for r in records
    }


@dataclass(frozen=True)
class ProbeEstimate:
    """Balanced sampling's probe images: one per candidate, at least one per identity and
    at most the candidate bound; their GPU time scaled from the job's throughput by
    denoising passes (steps x 2 with classifier-free guidance), which leaves out the VAE
    decode and so underestimates short probes a little."""

    fewest: int
    most: int
    settings: str
    seconds: tuple[float, float] | None

    def rows(self) -> list[tuple[str, Any]]:
        rows = [
            ("balance probes (one per candidate)", f"{self.fewest:,} .. {self.most:,}"),
            ("probe settings", self.settings),
        ]
        if self.seconds is not None:
            low, high = (value / 3600 for value in self.seconds)
            rows.append(("estimated probe GPU hours", f"{low:,.3g} .. {high:,.3g}"))
        return rows


def _passes(steps: int, guidance: float) -> int:
    return steps * (2 if guidance > 1.0 else 1)


def _has_files(root: str, component: str) -> bool:
    try:
        models_dir.require(root, component)
    except ModelFileMissing:
        return False
    return True


def estimate_probes(spec: JobSpec, throughput: float | None) -> ProbeEstimate | None:
    """The probe count range and cost of `identities.balance` (None when off)."""
    source = spec.identities
    balance = source.balance
    if balance is None:
        return None
    most = source.balance_candidates()
    if source.source == "packed":
        most = min(most, math.ceil(source.count * balance.oversample))
    scheduler = balance.probe_scheduler
    if scheduler == "auto":  # a look at the files, no model loaded
        scheduler = "lcm" if _has_files(spec.models.dir, "lcm") else "dpmsolver++"
    steps = balance.probe_steps or PROBE_STEPS[scheduler]
    guidance = DPM_GUIDANCE if scheduler == "dpmsolver++" else LCM_GUIDANCE
    probe = _passes(steps, guidance)
    job = _passes(spec.generation.steps, spec.generation.guidance)
    settings = f"{scheduler}, {steps} steps, guidance {guidance:g}"
    seconds = None
    if throughput:
        per_probe = probe / job / throughput
        seconds = (source.count * per_probe, most * per_probe)
    return ProbeEstimate(source.count, most, settings, seconds)


@dataclass(frozen=True)
class PlanSummary:
    name: str
    identities: int
    identities_exact: bool
    images_per_identity: int
    images: int
    shards: int
    identities_per_shard: int
    images_per_shard: int
    max_attempts: int
    max_images_with_topups: int
    devices: int
    throughput_images_per_s: float | None
    throughput_source: str
    estimated_gpu_seconds: float | None
    estimated_gpu_seconds_max: float | None
    probes: ProbeEstimate | None = None  # identities.balance

    def rows(self) -> list[tuple[str, Any]]:
        """(what, value) pairs for a table; the CLI prints them."""
        count = f"{self.identities:,}" + ("" if self.identities_exact else " (at most)")
        rows = [
            ("identities", count),
            ("images per identity", self.images_per_identity),
            ("images (first attempts)", f"{self.images:,}"),
            (
                f"images with top-ups (max {self.max_attempts} attempts)",
                f"{self.max_images_with_topups:,}",
            ),
            ("shards", f"{self.shards:,}"),
            (
                "identities / images per shard",
                f"{self.identities_per_shard} / {self.images_per_shard}",
            ),
            ("throughput (images/s per GPU)", self._throughput()),
        ]
        if self.probes is not None:
            rows += self.probes.rows()
        if self.estimated_gpu_seconds is not None:
            low, high = self.estimated_gpu_seconds / 3600, self.estimated_gpu_seconds_max / 3600
            rows.append(
                ("estimated GPU hours (no top-ups .. all top-ups)", f"{low:,.1f} .. {high:,.1f}")
            )
            rows.append(
                (
                    f"estimated wall hours on {self.devices} device(s)",
                    f"{low / self.devices:,.1f} .. {high / self.devices:,.1f}",
                )
            )
        return rows

    def _throughput(self) -> str:
        if self.throughput_images_per_s is None:
            return f"unknown ({self.throughput_source})"
        return f"{self.throughput_images_per_s:g} ({self.throughput_source})"


def summarize(
    spec: JobSpec,
    throughput_images_per_s: float | None = None,
    throughput_table: Mapping[tuple[str, int, int, int], Mapping[str, Any]] | None = None,
) -> PlanSummary:
    """Counts, shards and an estimate of GPU time; reads at most a file header, no model."""
    identities, exact = identity_count(spec)
    per_identity = spec.variations.images_per_identity
    per_shard = identities_per_shard(per_identity, spec.output.shard_size)
    images = identities * per_identity
    throughput, source = _throughput(spec, throughput_images_per_s, throughput_table)
    with_topups = images * spec.filter.max_attempts
    return PlanSummary(
        name=spec.name,
        identities=identities,
        identities_exact=exact,
        images_per_identity=per_identity,
        images=images,
        shards=shard_count(identities, per_identity, spec.output.shard_size),
        identities_per_shard=per_shard,
        images_per_shard=per_shard * per_identity,
        max_attempts=spec.filter.max_attempts,
        max_images_with_topups=with_topups,
        devices=len(spec.compute.devices),
        throughput_images_per_s=throughput,
        throughput_source=source,
        estimated_gpu_seconds=images / throughput if throughput else None,
        estimated_gpu_seconds_max=with_topups / throughput if throughput else None,
        probes=estimate_probes(spec, throughput),
    )


def _throughput(
    spec: JobSpec,
    given: float | None,
    table: Mapping[tuple[str, int, int, int], Mapping[str, Any]] | None,
) -> tuple[float | None, str]:
    if given is not None:
        if not (math.isfinite(given) and given > 0):
            raise SpecError(
                f"--throughput must be a positive number of images/s, got {given:g}: "
                "give the rate bench/bench_engine.py measured"
            )
        return float(given), "given"
    generation = spec.generation
    key = (generation.scheduler, generation.steps, generation.height, generation.width)
    record = (table if table is not None else MEASURED_THROUGHPUT).get(key)
    if record is None:
        settings = f"{key[0]}, {key[1]} steps, {key[2]}x{key[3]}"
        return None, f"no measurement for {settings}; pass a measured throughput"
    where = record.get("device", "unknown device")
    return float(record["images_per_s"]), f"measured on {where}"


def identity_count(spec: JobSpec) -> tuple[int, bool]:
    """(identities, exact): random is exact; file reads its header; images counts photos,
    an upper bound since photos without a face are skipped."""
    source = spec.identities
    cap = source.count
    if source.source == "random" or source.balance is not None:
        return cap, True  # a balanced job keeps exactly count, or is refused
    options = spec.output.storage_options
    if source.source == "file":
        rows = _embedding_rows(source.path, options)
        return (min(rows, cap) if cap else rows), True
    photos = _photo_count(source.path, options)
    return (min(photos, cap) if cap else photos), False


def _embedding_rows(uri: str, storage_options: dict[str, Any]) -> int:
    from arc2face_engine.identities.sources import embedding_file_rows

    return embedding_file_rows(uri, storage_options)


def _photo_count(uri: str, storage_options: dict[str, Any]) -> int:
    from arc2face_engine.identities.sources import list_image_files

    return len(list_image_files(uri, storage_options)[2])
