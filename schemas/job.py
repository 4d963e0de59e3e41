"""The job spec: one YAML file that describes a dataset, validated by pydantic.

Every section forbids unknown keys so a typo fails loudly instead of silently
falling back to a default. `load_spec` turns pydantic's errors into one
`SpecError` whose first line names every bad field by its dotted path.

Over 600 lines on purpose: the spec is one concept, and every section's fields, defaults,
bounds and cross-field checks sit together, next to the loader that reports them, so a
reader (and docs/job-spec.md, generated from these models) sees the whole contract at once.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import json
import re
from pathlib import PurePosixPath
from typing import Any, Literal

import fsspec
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from schemas.constants import (  # noqa: F401 - re-exported
    DEFAULT_SIZE,
    DPM_GUIDANCE,
    DPM_STEPS,
    LCM_GUIDANCE,
    LCM_STEPS,
    SCHEDULERS,
    VAE_FACTOR,
    check_image_side,
)
from schemas.errors import SpecError, resolved_against
from schemas.tables import DEFAULT_AGE_EDGES, GENDERS, SKIN_TONES, age_band_names

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DEFAULT_RANDOM_COUNT = 100
# Bounds that keep memory bounded whatever a spec asks for: identities are held in memory
# (1M x 512 float32 = 2 GiB), a shard's rows and images too (at most
# max(shard_size, images_per_identity) x max_attempts rows), banks are rendered up front.
MAX_IDENTITIES = 1_000_000
MAX_IMAGES_PER_IDENTITY = 10_000
MAX_SHARD_SIZE = 65_536
MAX_ATTEMPTS = 100
MAX_EXPRESSIONS = 100_000
MAX_IMAGE_SIDE = 4096
MAX_POSE_GRID = 4096  # rendered normal maps, each height x width x 3 bytes
# The sampler defaults and the image-side rule live in schemas.constants (the engine reads
# them without pydantic); re-exported here for the spec's users.
def check_lcm_guidance(guidance: float) -> float:
    if guidance > LCM_GUIDANCE:
        raise ValueError(
            f"lcm is distilled without classifier-free guidance, got {guidance:g}: "
            f"set guidance to {LCM_GUIDANCE}"
        )
    return guidance


def default_batch_buckets(batch_size: int) -> list[int]:
    """Powers of two below `batch_size`, then `batch_size`: a ragged batch is padded to
    less than twice its size, and a compiled model sees at most log2(batch_size) + 1 shapes."""
    buckets = [1 << power for power in range(batch_size.bit_length()) if 1 << power < batch_size]
    return [*buckets, batch_size]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _check_device(device: str) -> str:
    if not DEVICE_PATTERN.match(device):
        raise ValueError(f"unknown device {device!r}: use auto, cpu, mps, cuda or cuda:N")
    return device


class ModelsSpec(_Section):
    dir: str = Field(
        "./models",
        min_length=1,
        description="Models directory in the published layout (`arc2face-synth models download DIR`, or `models tiny DIR` for stand-ins).",
    )
    device: str = Field(
        "auto", description="Device for single-process runs: auto, cpu, mps, cuda or cuda:N."
    )
    precision: Literal["auto", "fp32", "fp16", "bf16"] = Field(
        "auto", description="Weights and activations dtype; auto = fp16 on CUDA, fp32 on CPU."
    )

    check_device = field_validator("device")(_check_device)


class PackingSpec(_Section):
    """Identity packing (source packed): spread identities apart near the face manifold."""

    gallery: str | None = Field(
        None,
        description="Face-manifold gallery: .parquet (column 'embedding') or .npy of M x 512 "
        "ArcFace embeddings of real-looking faces, local path or URI; null: build one from "
        "`probes` Arc2Face probe images (generate, re-embed with ArcFace).",
    )
    probes: int = Field(
        256, gt=0, description="gallery null: how many probe images build the gallery."
    )
    separation_target: float = Field(
        0.2,
        gt=-1.0,
        lt=1.0,
        description="Cosine the optimiser pushes every nearest-neighbour pair below; pairs "
        "already below it stop repelling, and the manifold term pulls them back to real faces.",
    )
    manifold_weight: float = Field(
        0.5,
        ge=0.0,
        description="Pull towards the nearest gallery embedding; higher = closer to real faces, "
        "less separation.",
    )
    steps: int = Field(100, gt=0, description="Projected gradient steps.")
    learning_rate: float = Field(
        0.05, gt=0.0, le=1.0, description="First step length (about radians); cosine decay."
    )
    neighbours: int = Field(
        8, gt=0, le=256, description="Nearest identities each identity is pushed away from."
    )


class ExclusionSpec(_Section):
    """Privacy by construction: no identity near a gallery of real people."""

    gallery: str | None = Field(
        None,
        description="Embeddings of real people no identity may resemble (e.g. of evaluation "
        "sets): .parquet (column 'embedding') or .npy of N x 512, or a dataset folder (its "
        "identities, e.g. an imported real dataset), local path or URI; null: off.",
    )
    max_cosine: float = Field(
        0.5,
        gt=-1.0,
        lt=1.0,
        description="No identity may have a cosine above this to any gallery embedding: random "
        "and packed identities are resampled or moved, a file that breaks it is refused, photos "
        "that break it are dropped and listed.",
    )


BALANCE_AXES = ("gender", "age", "skin_tone")
SHARE_TOLERANCE = 1e-6  # shares must sum to 1 within this
MAX_BALANCE_CANDIDATES = 10 * MAX_IDENTITIES
PROBE_STEPS = {"lcm": LCM_STEPS, "dpmsolver++": 12}  # cheap: a probe only has to show a face


def _check_shares(shares: dict[str, float], what: str) -> dict[str, float]:
    bad = {key: value for key, value in shares.items() if not 0.0 <= value <= 1.0}
    if bad:
        raise ValueError(f"{what} shares {bad} outside [0, 1]: use fractions of the count")
    total = sum(shares.values())
    if abs(total - 1.0) > SHARE_TOLERANCE:
        raise ValueError(f"{what} shares sum to {total:g}, not 1: make them add up to 1")
    return shares


class BalanceCell(_Section):
    """One cell of a joint target table: values of the balanced axes and its share."""

    gender: Literal[GENDERS] | None = Field(None, description="female or male.")
    age: str | None = Field(None, description="An age band name (see age_edges), e.g. 20-30.")
    skin_tone: Literal[SKIN_TONES] | None = Field(None, description="An ITA category.")
    share: float = Field(..., ge=0.0, le=1.0, description="Fraction of the identities.")


class BalanceSpec(_Section):
    """Balanced identity sampling: each candidate identity gets one probe image whose
    predicted gender and age and measured skin tone (ITA) place it in a cell; candidates
    fill the cells until every quota is met (docs/composition.md)."""

    gender: dict[Literal[GENDERS], float] | None = Field(
        None, description="Target shares of predicted gender, e.g. {female: 0.5, male: 0.5}."
    )
    age: dict[str, float] | None = Field(
        None,
        description="Target shares of predicted age bands named by age_edges, e.g. "
        "{0-20: 0.1, 20-30: 0.3, ...}; bands left out get no identity.",
    )
    skin_tone: dict[Literal[SKIN_TONES], float] | None = Field(
        None,
        description="Target shares of the measured ITA categories (very_light, light, "
        "intermediate, tan, brown, dark); categories left out get no identity.",
    )
    joint: list[BalanceCell] | None = Field(
        None,
        description="Instead of the marginals above: a joint table, one entry per cell "
        "(the same axes in every entry) with its share.",
    )
    age_edges: list[float] = Field(
        default_factory=lambda: list(DEFAULT_AGE_EDGES),
        min_length=1,
        description="Lower edges of the age bands in years, ascending; a band includes its "
        "lower edge and the last is open (default bands 0-20, 20-30, ..., 60+).",
    )
    max_candidates: int | None = Field(
        None,
        gt=0,
        le=MAX_BALANCE_CANDIDATES,
        description="Candidates probed at most (default 10 x count); when they run out the "
        "job is refused, naming the cell that could not be filled, before anything is written.",
    )
    oversample: float = Field(
        3.0,
        ge=1.0,
        le=100.0,
        description="packed: candidates packed per wanted identity, from which the cells are filled.",
    )
    probe_scheduler: Literal["auto", "lcm", "dpmsolver++"] = Field(
        "auto",
        description="Sampler of the probe images; auto = lcm when the models directory holds "
        "the LCM-LoRA, else dpmsolver++.",
    )
    probe_steps: int | None = Field(
        None,
        gt=0,
        le=1000,
        description="Probe inference steps; default 4 for lcm, 12 for dpmsolver++.",
    )

    @field_validator("age_edges")
    @classmethod
    def _ascending_edges(cls, edges: list[float]) -> list[float]:
        if edges[0] < 0 or any(high <= low for low, high in itertools.pairwise(edges)):
            raise ValueError(f"age_edges {edges} are not ascending from >= 0: e.g. [0, 20, 40, 60]")
        return edges

    @model_validator(mode="after")
    def _targets(self) -> BalanceSpec:
        marginals = {axis: getattr(self, axis) for axis in BALANCE_AXES}
        given = [axis for axis, shares in marginals.items() if shares is not None]
        if self.joint is not None and given:
            raise ValueError(
                f"joint and marginal targets ({', '.join(given)}) both given: use one of them"
            )
        if self.joint is None and not given:
            raise ValueError("no targets: give gender, age or skin_tone shares, or a joint table")
        bands = age_band_names(self.age_edges)
        if self.age is not None:
            self._check_bands(self.age.keys(), bands)
        for axis in given:
            _check_shares(marginals[axis], axis)
        if self.joint is not None:
            self._check_joint(bands)
        return self

    @staticmethod
    def _check_bands(names, bands: list[str]) -> None:
        unknown = sorted(set(names) - set(bands))
        if unknown:
            raise ValueError(
                f"unknown age band {unknown[0]!r}: use one of {', '.join(bands)} (from age_edges)"
            )

    def _check_joint(self, bands: list[str]) -> None:
        axes = {tuple(a for a in BALANCE_AXES if getattr(cell, a) is not None) for cell in self.joint}
        if len(axes) != 1 or not next(iter(axes)):
            raise ValueError("joint cells name different axes: give the same axes in every cell")
        self._check_bands([cell.age for cell in self.joint if cell.age is not None], bands)
        keys = [tuple(getattr(cell, a) for a in BALANCE_AXES) for cell in self.joint]
        if len(set(keys)) != len(keys):
            raise ValueError("a joint cell is listed twice: give each cell once")
        _check_shares(
            {str(key): cell.share for key, cell in zip(keys, self.joint, strict=True)}, "joint"
        )

    def axes(self) -> tuple[str, ...]:
        """The balanced axes, in BALANCE_AXES order."""
        if self.joint is not None:
            return tuple(a for a in BALANCE_AXES if getattr(self.joint[0], a) is not None)
        return tuple(a for a in BALANCE_AXES if getattr(self, a) is not None)


class IdentitiesSpec(_Section):
    source: Literal["random", "packed", "file", "images"] = Field(
        "random",
        description="random: sample ArcFace embeddings on the unit sphere; packed: optimise "
        "them apart near a face-manifold gallery (see packing); file: read a "
        ".parquet/.npy of N x 512 embeddings; images: embed the largest face of each photo "
        "in a folder.",
    )
    count: int | None = Field(
        None,
        gt=0,
        le=MAX_IDENTITIES,
        validate_default=True,
        description=f"random/packed: how many identities (default {DEFAULT_RANDOM_COUNT}); "
        "file/images: optional cap on how many rows/photos are used (default all).",
    )
    separation: float = Field(
        0.3,
        gt=0.0,
        le=1.0,
        description="random: maximum cosine similarity allowed between any two accepted "
        "identities; lower = more distinct identities but more rejected candidates.",
    )
    path: str | None = Field(
        None,
        validate_default=True,
        description="file: .parquet (column 'embedding') or .npy of N x 512; images: folder or "
        "URI holding .jpg/.jpeg/.png/.webp photos.",
    )
    project_to_manifold: bool = Field(
        False,
        validate_default=True,
        description="random: generate a probe image per candidate, re-embed it with ArcFace and "
        "keep the re-embedded vector (costs one generation per candidate).",
    )
    packing: PackingSpec = Field(
        default_factory=PackingSpec, description="packed: gallery and optimiser settings."
    )
    exclusion: ExclusionSpec = Field(
        default_factory=ExclusionSpec,
        description="Every source: keep identities away from a gallery of real people.",
    )
    balance: BalanceSpec | None = Field(
        None,
        description="Balanced sampling over predicted gender, age bands and skin-tone (ITA) "
        "categories; null: off. Needs count (file/images: how many to keep).",
    )

    @field_validator("count")
    @classmethod
    def _default_random_count(cls, count: int | None, info: ValidationInfo) -> int | None:
        if count is None and info.data.get("source") in ("random", "packed"):
            return DEFAULT_RANDOM_COUNT
        return count

    @field_validator("path")
    @classmethod
    def _path_matches_source(cls, path: str | None, info: ValidationInfo) -> str | None:
        source = info.data.get("source")
        if source in ("file", "images") and not path:
            what = "a .parquet/.npy embedding file" if source == "file" else "a folder of photos"
            raise ValueError(f"source '{source}' needs a path: set it to {what}")
        if source in ("random", "packed") and path:
            raise ValueError(
                f"source '{source}' reads no file: remove path or set source to file/images"
            )
        return path

    @field_validator("project_to_manifold")
    @classmethod
    def _projection_needs_random(cls, project: bool, info: ValidationInfo) -> bool:
        source = info.data.get("source")
        if project and source not in (None, "random"):
            raise ValueError(
                f"projection only applies to source 'random', not '{source}': set it to false"
            )
        return project

    @model_validator(mode="after")
    def _balance_needs_count(self) -> IdentitiesSpec:
        balance = self.balance
        if balance is None:
            return self
        if self.count is None:
            raise ValueError(
                f"balance needs count with source '{self.source}': set identities.count to "
                "how many identities to keep"
            )
        if balance.max_candidates is not None and balance.max_candidates < self.count:
            raise ValueError(
                f"balance.max_candidates {balance.max_candidates} is below count {self.count}: "
                "raise it (default 10 x count)"
            )
        return self

    def balance_candidates(self) -> int:
        """How many candidates a balanced job may probe."""
        assert self.balance is not None and self.count is not None
        default = min(10 * self.count, MAX_BALANCE_CANDIDATES)
        return self.balance.max_candidates or default


def _angle_list(low: float, high: float, what: str):
    def check(values: list[float]) -> list[float]:
        bad = [v for v in values if not low <= v <= high]
        if bad:
            raise ValueError(
                f"{what} {bad} outside [{low:g}, {high:g}] degrees: use angles in range"
            )
        return values

    return check


class PosesSpec(_Section):
    kind: Literal["none", "folder", "mesh", "procedural"] = Field(
        "none",
        description="none: no pose control; folder: pose images + poses.csv/parquet (file, yaw, "
        "pitch, roll); mesh: render an .obj/.ply head over the yaw/pitch/roll grid; procedural: "
        "render the built-in head over the grid.",
    )
    path: str | None = Field(
        None,
        validate_default=True,
        description="folder: folder of pose images with poses.csv/parquet; mesh: .obj/.ply file.",
    )
    yaw: list[float] = Field(
        default_factory=lambda: [0.0],
        min_length=1,
        description="mesh/procedural grid: yaw angles in degrees, frontal hemisphere [-90, 90].",
    )
    pitch: list[float] = Field(
        default_factory=lambda: [0.0],
        min_length=1,
        description="mesh/procedural grid: pitch angles in degrees, [-90, 90].",
    )
    roll: list[float] = Field(
        default_factory=lambda: [0.0],
        min_length=1,
        description="mesh/procedural grid: roll angles in degrees, [-180, 180].",
    )

    @field_validator("path")
    @classmethod
    def _path_matches_kind(cls, path: str | None, info: ValidationInfo) -> str | None:
        kind = info.data.get("kind")
        if kind in ("folder", "mesh") and not path:
            what = "a folder of pose images" if kind == "folder" else "an .obj/.ply mesh"
            raise ValueError(f"pose kind '{kind}' needs a path: set it to {what}")
        return path

    check_yaw = field_validator("yaw")(_angle_list(-90, 90, "yaw"))
    check_pitch = field_validator("pitch")(_angle_list(-90, 90, "pitch"))
    check_roll = field_validator("roll")(_angle_list(-180, 180, "roll"))

    @model_validator(mode="after")
    def _bounded_grid(self) -> PosesSpec:
        cells = len(self.yaw) * len(self.pitch) * len(self.roll)
        if cells > MAX_POSE_GRID:
            raise ValueError(
                f"the yaw x pitch x roll grid has {cells} poses, more than {MAX_POSE_GRID}: "
                "use fewer angles"
            )
        return self


class ExpressionsSpec(_Section):
    kind: Literal["none", "neutral", "file", "random"] = Field(
        "none",
        description="none: no expression control; neutral: all-zero FLAME expression; file: "
        "read FLAME vectors (55 values) from a file; random: sample from the per-component prior.",
    )
    path: str | None = Field(
        None,
        validate_default=True,
        description="file: .parquet/.npy/.yaml of 55-value FLAME expression vectors.",
    )
    count: int = Field(
        8, gt=0, le=MAX_EXPRESSIONS, description="random: how many expressions to sample."
    )
    spread: float = Field(
        1.0, gt=0.0, description="random: multiplier of the per-component prior std."
    )

    @field_validator("path")
    @classmethod
    def _path_matches_kind(cls, path: str | None, info: ValidationInfo) -> str | None:
        if info.data.get("kind") == "file" and not path:
            raise ValueError("expression kind 'file' needs a path: set it to a .parquet/.npy/.yaml")
        return path


class VariationsSpec(_Section):
    images_per_identity: int = Field(
        20,
        gt=0,
        le=MAX_IMAGES_PER_IDENTITY,
        description="Wanted images per identity (before top-ups of rejected ones).",
    )
    poses: PosesSpec = Field(default_factory=PosesSpec, description="Head-pose control.")
    expressions: ExpressionsSpec = Field(
        default_factory=ExpressionsSpec, description="Facial-expression control."
    )


class GenerationSpec(_Section):
    """Sampler settings (-> generation.GenerationSettings.from_spec) and how the engine
    runs them (batch size, buckets, compile: they never change which image a seed gives
    on CPU, so they are left out of the spec hash)."""

    scheduler: Literal[SCHEDULERS] = Field(
        "dpmsolver++",
        description="dpmsolver++: Arc2Face's default sampler; lcm: LCM-LoRA, 2-8 steps, no CFG.",
    )
    steps: int | None = Field(
        None,
        gt=0,
        le=1000,
        validate_default=True,
        description="Denoising steps; default 25 for dpmsolver++, 4 for lcm (which works at 2-8).",
    )
    guidance: float | None = Field(
        None,
        ge=1.0,
        validate_default=True,
        description="Classifier-free guidance scale; default 3.0 for dpmsolver++ (Arc2Face's "
        "default), 1.0 for lcm (no CFG). 1.0 disables CFG.",
    )
    batch_size: int = Field(
        16,
        gt=0,
        description="Images per engine call and per GPU forward (the engine's max_batch_size); "
        "does not change which image a seed gives on CPU, where every image runs alone.",
    )
    batch_buckets: list[int] | None = Field(
        None,
        validate_default=True,
        description="GPU forward sizes a smaller batch (top-ups, a shard's tail) is padded up "
        "to, so a compiled model never meets a new shape; padded images are dropped. Each in "
        "1..batch_size; batch_size is always a bucket. null: powers of two up to batch_size "
        "when compile is on, no padding otherwise. No effect on CPU.",
    )
    compile: bool = Field(
        False,
        description="torch.compile the UNet, ControlNet and VAE decoder (GPU): faster after "
        "the first batch of each bucket size, which pays the compile time.",
    )
    height: int = Field(
        DEFAULT_SIZE, gt=0, le=MAX_IMAGE_SIDE, description="Image height in pixels, a multiple of 8."
    )
    width: int = Field(
        DEFAULT_SIZE, gt=0, le=MAX_IMAGE_SIDE, description="Image width in pixels, a multiple of 8."
    )
    controlnet_scale: float = Field(
        1.0,
        ge=0.0,
        description="Pose ControlNet conditioning scale (used when poses.kind != none).",
    )
    expression_scale: float = Field(
        1.0, ge=0.0, description="Expression adapter scale (used when expressions.kind != none)."
    )

    @field_validator("steps")
    @classmethod
    def _default_steps(cls, steps: int | None, info: ValidationInfo) -> int:
        if steps is None:
            return LCM_STEPS if info.data.get("scheduler") == "lcm" else DPM_STEPS
        return steps

    @field_validator("guidance")
    @classmethod
    def _lcm_has_no_cfg(cls, guidance: float | None, info: ValidationInfo) -> float:
        lcm = info.data.get("scheduler") == "lcm"
        if guidance is None:
            return LCM_GUIDANCE if lcm else DPM_GUIDANCE
        return check_lcm_guidance(guidance) if lcm else guidance

    @field_validator("batch_buckets")
    @classmethod
    def _buckets_fit_the_batch(cls, buckets: list[int] | None, info: ValidationInfo):
        batch_size = info.data.get("batch_size")
        if buckets is None or batch_size is None:
            return buckets
        bad = [bucket for bucket in buckets if not 1 <= bucket <= batch_size]
        if bad:
            raise ValueError(
                f"buckets {bad} outside 1..batch_size ({batch_size}): use sizes in that range"
            )
        return sorted({*buckets, batch_size})

    @field_validator("height", "width")
    @classmethod
    def _multiple_of_8(cls, size: int, info: ValidationInfo) -> int:
        return check_image_side(info.field_name, size)

    def engine_buckets(self) -> list[int] | None:
        """The bucket sizes the engine pads to (see batch_buckets)."""
        if self.batch_buckets is not None:
            return self.batch_buckets
        return default_batch_buckets(self.batch_size) if self.compile else None


class FilterSpec(_Section):
    min_similarity: float = Field(
        0.4,
        ge=-1.0,
        le=1.0,
        description="Minimum cosine similarity between ArcFace of the generated image and the "
        "identity embedding. Published ArcFace IResNet-100 verification thresholds at very low "
        "false-accept rates (about 1e-5 to 1e-6 on IJB-C-style benchmarks) sit roughly at cosine "
        "0.3-0.35 (approximate literature values); 0.4 is stricter than that, while Arc2Face "
        "generations typically score well above it against their conditioning embedding.",
    )
    min_det_score: float = Field(
        0.5, ge=0.0, le=1.0, description="Minimum SCRFD detection score of the face."
    )
    require_single_face: bool = Field(
        True, description="Reject images in which the detector finds more than one face."
    )
    min_feature_norm: float = Field(
        0.0,
        ge=0.0,
        description="Minimum ArcFace feature norm (before normalisation) of the face, an "
        "image-quality proxy (AdaFace): blurry or degraded faces have small norms. 0 = off. "
        "The scale depends on the recognition model, so pick the value from the audit's "
        "feature_norm distribution of a pilot run. Rejected images get reason "
        "low_feature_norm.",
    )
    max_similarity: float = Field(
        1.0,
        gt=-1.0,
        le=1.0,
        description="Maximum cosine similarity to the identity embedding; 1.0 = off. An image "
        "above it is a near-copy of the identity that adds no intra-class variation for "
        "training; rejected with reason too_similar. Must be above min_similarity.",
    )
    max_attempts: int = Field(
        3,
        ge=1,
        le=MAX_ATTEMPTS,
        description="Tries per wanted image: a rejected image is regenerated with a new seed "
        "until accepted or this many attempts were made.",
    )

    @model_validator(mode="after")
    def _similarity_window(self) -> FilterSpec:
        if self.max_similarity < 1.0 and self.max_similarity <= self.min_similarity:
            raise ValueError(
                f"max_similarity {self.max_similarity:g} is not above min_similarity "
                f"{self.min_similarity:g}: no image could pass; raise max_similarity (1.0 = off)"
            )
        return self


class OutputSpec(_Section):
    uri: str = Field(
        "./dataset", min_length=1, description="Dataset folder or object-store prefix (s3://...)."
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="fsspec storage options for the URI (e.g. client_kwargs, profile). Keep "
        "credentials out of the spec: a string value '${env:NAME}' is read from the worker's "
        "environment at run time, and storage_options_secret names a Prefect Secret block.",
    )
    storage_options_secret: str | None = Field(
        None,
        min_length=1,
        description="Name of a Prefect Secret block holding a JSON object of storage options "
        "(e.g. key and secret) merged over storage_options at run time; never recorded.",
    )
    image_format: Literal["jpeg", "png", "webp"] = Field("jpeg", description="Image file format.")
    quality: int = Field(95, ge=1, le=100, description="jpeg/webp quality (ignored by png).")
    shard_size: int = Field(
        256,
        gt=0,
        le=MAX_SHARD_SIZE,
        description="Target images per shard; shards hold whole identities "
        "(max(1, shard_size // images_per_identity) identities each).",
    )
    keep_rejected_images: bool = Field(
        True, description="Also write image files of rejected images (their rows are always kept)."
    )


class ComputeSpec(_Section):
    task_runner: Literal["local", "dask"] = Field(
        "local", description="local: threads in this process; dask: a Dask cluster."
    )
    devices: list[str] = Field(
        default_factory=lambda: ["auto"],
        min_length=1,
        description="One worker per entry: auto, cpu, mps, cuda or cuda:N.",
    )
    dask_address: str | None = Field(
        None,
        validate_default=True,
        description="dask: scheduler address (tcp://host:8786); null starts a local cluster.",
    )
    allow_cpu_face_analysis: bool = Field(
        False,
        description="Let a job that generates on a CUDA GPU verify faces on the CPU when face "
        "analysis cannot run on the GPU (the batched torch runner cannot convert the face "
        "models and onnxruntime-gpu is not installed). Off: preflight refuses, because CPU "
        "face analysis caps a GPU job at a few images/s.",
    )
    max_shards_in_flight: int | None = Field(
        None,
        ge=1,
        description="Shards submitted but not finished, at most; shards are submitted as "
        "others finish, so a 40k-shard job never holds 40k task runs. Null: 2 per device, "
        "or 256 with a dask_address (the cluster's size is not known in advance).",
    )

    device_limits: Literal["gpu", "all", "off"] = Field(
        "gpu",
        description="Prefect global concurrency limits, one slot per device (gpu-<host>-<index>), "
        "so shards of concurrent jobs never share a device: gpu = CUDA devices only, all = CPU "
        "and MPS too, off = none (for runs without a Prefect server's limits).",
    )

    @field_validator("devices")
    @classmethod
    def _known_devices(cls, devices: list[str]) -> list[str]:
        for device in devices:
            _check_device(device)
        return devices

    @field_validator("dask_address")
    @classmethod
    def _address_needs_dask(cls, address: str | None, info: ValidationInfo) -> str | None:
        if address and info.data.get("task_runner") == "local":
            raise ValueError(
                "only the dask task runner uses it: set task_runner to dask or remove it"
            )
        return address


class JobSpec(_Section):
    """A whole generation job: what to make, how, and where to write it."""

    name: str = Field(..., min_length=1, description="Free-text job name (dataset card title).")
    license: str | None = Field(
        None,
        min_length=1,
        max_length=100,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9.+-]*$",
        description="License of the dataset as a Hugging Face license id (e.g. cc-by-nc-4.0); "
        "exports write it into dataset cards ('other' when unset).",
    )
    seed: int = Field(
        0,
        ge=0,
        lt=2**63,
        description="Job seed: identities, variants and every image seed derive from it.",
    )
    models: ModelsSpec = Field(default_factory=ModelsSpec, description="Model files and device.")
    identities: IdentitiesSpec = Field(
        default_factory=IdentitiesSpec, description="Where identity embeddings come from."
    )
    variations: VariationsSpec = Field(
        default_factory=VariationsSpec, description="Images per identity, poses, expressions."
    )
    generation: GenerationSpec = Field(
        default_factory=GenerationSpec, description="Diffusion sampler settings."
    )
    filter: FilterSpec = Field(default_factory=FilterSpec, description="ArcFace re-verification.")
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where and how to write.")
    compute: ComputeSpec = Field(default_factory=ComputeSpec, description="Where to run.")


# --- loading and error reporting ------------------------------------------------------------


def _section_model(loc: tuple) -> type[BaseModel] | None:
    """The model class that owns the last key of `loc` (for 'did you mean' on unknown keys)."""
    model: type[BaseModel] = JobSpec
    for key in loc[:-1]:
        field = model.model_fields.get(str(key))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _describe(error: dict) -> str:
    """One error as 'problem: fix', without pydantic's 'Value error, ' prefix."""
    kind = error["type"]
    if kind == "extra_forbidden":
        key = str(error["loc"][-1])
        model = _section_model(error["loc"])
        allowed = sorted(model.model_fields) if model else []
        close = difflib.get_close_matches(key, allowed, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"allowed: {', '.join(allowed)}"
        return f"unknown key: remove it ({hint})"
    if kind == "missing":
        return "required field is missing: add it"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    shown = repr(error.get("input"))
    shown = shown if len(shown) <= 40 else shown[:37] + "..."
    return f"{error['msg']} (got {shown}): change it"


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc) or "<top level>"


def spec_error(source: str, error: ValidationError) -> SpecError:
    """A SpecError whose first line names every bad field; one line per field follows."""
    problems = [(_dotted(e["loc"]), _describe(e)) for e in error.errors()]
    if len(problems) == 1:
        field, problem = problems[0]
        return SpecError(f"job spec {source}: {field}: {problem}")
    names = ", ".join(field for field, _ in problems)
    lines = [f"job spec {source} has {len(problems)} invalid fields: {names}"]
    lines += [f"  {field}: {problem}" for field, problem in problems]
    return SpecError("\n".join(lines))


def parse_spec(data: Any, source: str = "<spec>") -> JobSpec:
    """Validate a mapping (e.g. parsed YAML) into a JobSpec; errors become SpecError."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise SpecError(
            f"job spec {source} is {kind}, not a mapping: write 'name: ...' etc. at top level"
        )
    try:
        return JobSpec.model_validate(data)
    except ValidationError as error:
        raise spec_error(source, error) from None


def load_spec(uri: str, storage_options: dict[str, Any] | None = None) -> JobSpec:
    """Read and validate a YAML job spec from a local path or fsspec URI."""
    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    try:
        with fs.open(path, "rb") as handle:
            text = handle.read().decode("utf-8")
    except FileNotFoundError:
        folder = resolved_against(str(uri))
        where = f" (resolved against {folder})" if folder else ""
        error = SpecError(f"job spec {uri} not found: check the path{where}")
        error.resolved_against = folder
        raise error from None
    except UnicodeDecodeError as error:
        raise SpecError(
            f"job spec {uri} is not UTF-8 text ({error.reason}): save it as UTF-8"
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise SpecError(
            f"job spec {uri} is not valid YAML ({_yaml_problem(error)}): fix the syntax there"
        ) from None
    return parse_spec(data, source=str(uri))


def _yaml_problem(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    if mark is None:
        return problem
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


# --- content hash and JSON schema -----------------------------------------------------------

# Fields that do not change which bytes end up in the dataset, so changing them must not
# block a resume: where the models and output live (model files are hashed separately into
# dataset.json), credentials, the device and runner, the batch size, buckets and compile
# (batching never changes which image a seed produces on CPU), the free-text name and the
# license.
HASH_EXCLUDED: dict[str, Any] = {
    "name": True,
    "license": True,
    "models": {"dir": True, "device": True},
    "generation": {"batch_size": True, "batch_buckets": True, "compile": True},
    "output": {"uri": True, "storage_options": True, "storage_options_secret": True},
    "compute": True,
}


def spec_hash(spec: JobSpec) -> str:
    """sha256 of the canonical JSON of the content-defining fields (see HASH_EXCLUDED)."""
    content = spec.model_dump(mode="json", exclude=HASH_EXCLUDED)
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _without_excluded(data: Any, excluded: Any) -> Any:
    """`data` (a spec as JSON) less the HASH_EXCLUDED fields."""
    if excluded is True:
        return None
    if not isinstance(data, dict) or not isinstance(excluded, dict):
        return data
    kept = {key: _without_excluded(value, excluded.get(key)) for key, value in data.items()}
    return {key: value for key, value in kept.items() if excluded.get(key) is not True}


def _leaves(data: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted path: value} of every non-mapping value (an empty mapping inside is a leaf)."""
    if not isinstance(data, dict) or (not data and prefix):
        return {prefix: data}
    found: dict[str, Any] = {}
    for key, value in data.items():
        found.update(_leaves(value, f"{prefix}.{key}" if prefix else str(key)))
    return found


MISSING = "absent"


def spec_differences(recorded: dict[str, Any], spec: JobSpec) -> list[tuple[str, Any, Any]]:
    """(dotted path, recorded value, new value) for every content-defining field (the ones
    spec_hash covers) that differs between a recorded spec (dataset.json) and `spec`,
    in path order; a field one side lacks shows as MISSING."""
    before = _leaves(_without_excluded(recorded, HASH_EXCLUDED))
    after = _leaves(spec.model_dump(mode="json", exclude=HASH_EXCLUDED))
    return [
        (path, before.get(path, MISSING), after.get(path, MISSING))
        for path in sorted(before.keys() | after.keys())
        if before.get(path, MISSING) != after.get(path, MISSING)
    ]


def describe_differences(
    differences: list[tuple[str, Any, Any]], most: int = 4, width: int = 40
) -> str:
    """'seed (0 -> 1), generation.steps (2 -> 3)', at most `most` fields, each value cut
    to `width` characters, so the message stays one bounded line."""

    def shown(value: Any) -> str:
        text = value if value is MISSING else json.dumps(value, ensure_ascii=True)
        return text if len(text) <= width else text[: width - 3] + "..."

    parts = [f"{path} ({shown(old)} -> {shown(new)})" for path, old, new in differences[:most]]
    if len(differences) > most:
        parts.append(f"and {len(differences) - most} more")
    return ", ".join(parts)


def recorded_spec(spec: JobSpec) -> dict[str, Any]:
    """The spec as JSON for dataset.json and cards, with storage option values redacted:
    they often hold credentials, and a dataset is meant to be shared."""
    data = spec.model_dump(mode="json")
    data["output"]["storage_options"] = {
        key: "<redacted>" for key in data["output"]["storage_options"]
    }
    return data


def json_schema() -> dict[str, Any]:
    """The JSON schema of job specs (editor completion, docs)."""
    schema = JobSpec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "arc2face-synth job spec"
    return schema


def write_json_schema(uri: str, storage_options: dict[str, Any] | None = None) -> str:
    """Write the JSON schema to a local path or fsspec URI; returns the path written."""
    fs, path = fsspec.core.url_to_fs(str(uri), **(storage_options or {}))
    parent = str(PurePosixPath(path).parent)
    if parent not in ("", "."):
        fs.makedirs(parent, exist_ok=True)
    fs.pipe_file(path, (json.dumps(json_schema(), indent=2) + "\n").encode("utf-8"))
    return path
