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

from schemas.errors import SpecError

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
# The sampler settings' one home: generation.GenerationSettings takes its defaults and
# checks from here. Arc2Face defaults (DPM-Solver++ 25 steps, CFG 3.0) and the LCM-LoRA
# sweet spot (4 steps, no CFG).
SCHEDULERS = ("dpmsolver++", "lcm")
DPM_STEPS, DPM_GUIDANCE, LCM_STEPS, LCM_GUIDANCE = 25, 3.0, 4, 1.0
DEFAULT_SIZE = 512
VAE_FACTOR = 8  # the VAE downsamples by 8: image sides are multiples of it


def check_image_side(name: str, size: int) -> int:
    """Raise ValueError unless `size` is a positive multiple of the VAE's factor."""
    if size < VAE_FACTOR or size % VAE_FACTOR:
        candidates = (size // VAE_FACTOR * VAE_FACTOR, size // VAE_FACTOR * VAE_FACTOR + VAE_FACTOR)
        nearest = " or ".join(str(v) for v in candidates if v > 0)
        raise ValueError(
            f"{name}={size} is not a positive multiple of {VAE_FACTOR} (the VAE downsamples "
            f"by {VAE_FACTOR}): use {nearest}"
        )
    return size


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
    max_attempts: int = Field(
        3,
        ge=1,
        le=MAX_ATTEMPTS,
        description="Tries per wanted image: a rejected image is regenerated with a new seed "
        "until accepted or this many attempts were made.",
    )


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
        raise SpecError(f"job spec {uri} not found: check the path") from None
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
