"""Batched Arc2Face generation: base, LCM, pose ControlNet and Expression Adapter.

One `generate` call takes any mix of identities, seeds, poses and expressions. Requests
that need the same pipeline (with or without a pose image, with or without an
expression) run together, each image with its own `torch.Generator`, and come back in
request order. Image i depends only on request i and the settings: the engine never
lets the rest of the batch leak into an image (on CPU bit-for-bit, see
`_CPU_MICRO_BATCH`).

The diffusion itself is diffusers' StableDiffusionPipeline /
StableDiffusionControlNetPipeline, called with Arc2Face's identity `prompt_embeds`
(conditioning.py) and the cached empty-prompt encoding as `negative_prompt_embeds`,
which is what the pipeline would compute itself from `prompt_embeds` alone.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import pickle
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import PIL.Image
import torch
from diffusers import (
    ControlNetModel,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils import logging as diffusers_logging
from peft import get_peft_model_state_dict
from safetensors import SafetensorError

from arc2face_engine import loading
from arc2face_engine.adapter_layouts import layout_of, unusable_reason, wants_token_axis
from arc2face_engine.conditioning import ARCFACE_DIM, IdentityConditioner
from arc2face_engine.errors import CheckpointMismatch, SpecError, UserError, first_line
from arc2face_engine.neighbours import CPU_THREADS, pinned_cpu_threads  # noqa: F401 - re-exported
from arc2face_engine.store import fetch_hint, require
from schemas.job import (
    DEFAULT_SIZE,
    DPM_GUIDANCE,
    DPM_STEPS,
    LCM_GUIDANCE,
    LCM_STEPS,
    SCHEDULERS,
    GenerationSpec,
    check_image_side,
)
from schemas.tables import EXPRESSION_DIM  # FLAME: 50 expression + 2 eyelid + 3 jaw

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LCM_LORA_FOLDER = "lcm-lora"
LCM_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LCM_ADAPTER_NAME = "lcm"
EXPRESSION_FOLDER = "exp_adapter"
EXPRESSION_WEIGHTS = "exp_adapter.bin"
_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any 64-bit value

# torch's CPU kernels are not batch-invariant: oneDNN picks its convolution algorithm by
# batch size (a 3x3 conv of batch 1 and of batch 8 differ in the last bit), and MKL's
# sgemm takes another code path for very few rows (the timestep MLP, the IP-Adapter
# projection: 2 rows vs 16 differ). Turning oneDNN off makes convolutions ~2.7x slower
# and still leaves the sgemm path, while one request per pipeline call costs little at
# real sizes: a CPU is already saturated by a single 512x512 image. So on CPU every request runs
# alone (its CFG pair is always the same 2-row batch); GPUs keep full batches.
_CPU_MICRO_BATCH = 1


# GenerationSettings fields named differently in the spec's generation section.
_SPEC_NAMES = {"num_inference_steps": "steps", "guidance_scale": "guidance"}


@dataclass(frozen=True)
class GenerationSettings:
    """How images are sampled; the same for every request of a `generate` call. Defaults
    and checks come from the job spec's generation section (schemas.job), their one home."""

    scheduler: str = SCHEDULERS[0]
    num_inference_steps: int = DPM_STEPS
    guidance_scale: float = DPM_GUIDANCE
    height: int = DEFAULT_SIZE
    width: int = DEFAULT_SIZE
    controlnet_scale: float = 1.0
    expression_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise SpecError(
                f"unknown scheduler {self.scheduler!r}: use one of {', '.join(SCHEDULERS)}"
            )
        if self.num_inference_steps < 1:
            raise SpecError(f"steps={self.num_inference_steps}: use at least 1 inference step")
        if self.guidance_scale < 0:
            raise SpecError(f"guidance={self.guidance_scale}: use a guidance scale >= 0")
        try:
            check_image_side("height", self.height)
            check_image_side("width", self.width)
        except ValueError as error:
            raise SpecError(str(error)) from None

    @classmethod
    def lcm(cls, steps: int = LCM_STEPS, **overrides: Any) -> GenerationSettings:
        """LCM-LoRA sampling: 2-4 steps, guidance 1.0 (no classifier-free guidance)."""
        return cls(
            **{
                "scheduler": "lcm",
                "num_inference_steps": steps,
                "guidance_scale": LCM_GUIDANCE,
                **overrides,
            }
        )

    @classmethod
    def from_spec(cls, generation: GenerationSpec) -> GenerationSettings:
        """The settings of a job spec's generation section (already validated there)."""
        return cls(
            **{
                field.name: getattr(generation, _SPEC_NAMES.get(field.name, field.name))
                for field in dataclasses.fields(cls)
            }
        )

    @property
    def uses_guidance(self) -> bool:
        """Classifier-free guidance (the pipeline doubles the batch) iff guidance > 1."""
        return self.guidance_scale > 1.0


@dataclass(frozen=True, eq=False)
class ImageRequest:
    """One image: an ArcFace identity, its seed and optional pose / expression controls."""

    embedding: np.ndarray  # (512,) ArcFace embedding; normalised by the engine
    seed: int
    pose_image: np.ndarray | None = None  # (H, W, 3) uint8 normal map (a PIL image is converted)
    expression: np.ndarray | None = None  # (55,) FLAME expression + eyelid + jaw

    def __post_init__(self) -> None:
        if isinstance(self.pose_image, PIL.Image.Image):
            rgb = np.asarray(self.pose_image.convert("RGB"), dtype=np.uint8)
            object.__setattr__(self, "pose_image", rgb)


# --- devices and precision -----------------------------------------------------------------


def resolve_device(device: str | torch.device) -> torch.device:
    """ "auto" -> cuda when a GPU is visible, else cpu."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise UserError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device!r} asked for but no CUDA GPU is visible: use cpu or auto")
    if resolved.type == "cuda" and resolved.index is not None:
        visible = torch.cuda.device_count()
        if resolved.index >= visible:
            raise UserError(
                f"device {device!r} asked for but only {visible} GPU(s) are visible: "
                f"use cuda:0 to cuda:{visible - 1}"
            )
    return resolved


def resolve_dtype(precision: str, device: torch.device) -> torch.dtype:
    """ "auto" -> fp16 on GPUs (Arc2Face's own setting), fp32 on CPU."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if precision not in PRECISIONS:
        raise UserError(f"unknown precision {precision!r}: use auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


# --- strict adapter loading ------------------------------------------------------------------


def _adapter_mismatch(
    file: Path, problem: str, models_dir: Path, component: str
) -> CheckpointMismatch:
    return CheckpointMismatch(
        f"{file} does not fit Arc2Face's UNet: {problem}; the file is corrupt or from another "
        f"model; re-download: {fetch_hint(models_dir, component)}"
    )


def _fuse_lcm_lora(pipeline: StableDiffusionPipeline, models_dir: Path) -> None:
    """Load the LCM-LoRA into `pipeline.unet`, refuse any key that does not fit, then fuse
    it into the weights and drop the LoRA layers (no per-layer LoRA cost at run time).

    diffusers only logs a warning for LoRA keys that match no module, and would load
    text-encoder keys into Arc2Face's encoder (which is not SD's), so the file is read
    with `lora_state_dict`, checked, and loaded into the UNet alone."""
    require(models_dir, "lcm", under=LCM_LORA_FOLDER)
    file = models_dir / LCM_LORA_FOLDER / LCM_LORA_WEIGHTS
    try:
        state_dict, network_alphas = pipeline.lora_state_dict(
            file.parent, weight_name=LCM_LORA_WEIGHTS
        )
    except (KeyError, ValueError, OSError, SafetensorError) as error:
        raise _adapter_mismatch(file, first_line(error), models_dir, "lcm") from error
    foreign = sorted(key for key in state_dict if not key.startswith("unet."))
    if foreign:
        problem = f"{len(foreign)} keys are not for the UNet ({', '.join(foreign[:3])})"
        raise _adapter_mismatch(file, problem, models_dir, "lcm")
    unet = pipeline.unet
    try:
        with _quiet_diffusers():
            pipeline.load_lora_into_unet(
                state_dict,
                network_alphas,
                unet=unet,
                adapter_name=LCM_ADAPTER_NAME,
                _pipeline=pipeline,
            )
    except (KeyError, ValueError, RuntimeError) as error:
        raise _adapter_mismatch(file, first_line(error), models_dir, "lcm") from error
    expected = set(
        convert_unet_state_dict_to_peft({k[len("unet.") :]: v for k, v in state_dict.items()})
    )
    loaded = set(get_peft_model_state_dict(unet, adapter_name=LCM_ADAPTER_NAME))
    unexpected = sorted(expected - loaded)
    if unexpected:
        problem = (
            f"{len(unexpected)} LoRA weights match no UNet layer ({', '.join(unexpected[:3])})"
        )
        raise _adapter_mismatch(file, problem, models_dir, "lcm")
    unet.fuse_lora(lora_scale=1.0, safe_fusing=True, adapter_names=[LCM_ADAPTER_NAME])
    unet.unload_lora()


def _read_expression_adapter(models_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    require(models_dir, "expression", under=EXPRESSION_FOLDER)
    file = models_dir / EXPRESSION_FOLDER / EXPRESSION_WEIGHTS
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as error:
        raise _adapter_mismatch(file, first_line(error), models_dir, "expression") from error
    if not isinstance(state_dict, dict) or not all(
        isinstance(state_dict.get(part), dict) for part in ("image_proj", "ip_adapter")
    ):
        problem = "it is not an IP-Adapter checkpoint (no image_proj / ip_adapter dicts)"
        raise _adapter_mismatch(file, problem, models_dir, "expression")
    return state_dict


def _load_expression_adapter(
    pipeline: StableDiffusionPipeline, state_dict: dict, models_dir: Path
) -> None:
    """diffusers' IP-Adapter loading, made strict: `low_cpu_mem_usage=False` makes it use
    `load_state_dict(strict=True)`; keys it never asks for (it silently ignores them) and
    an input width other than the 55 FLAME values are checked here. Every image-projection
    layout diffusers builds is accepted (adapter_layouts) unless it needs more than FLAME."""
    file = models_dir / EXPRESSION_FOLDER / EXPRESSION_WEIGHTS
    layout = layout_of(state_dict["image_proj"])
    refused = unusable_reason(layout)
    if refused:
        raise _adapter_mismatch(file, refused, models_dir, "expression")
    try:
        with _quiet_diffusers():
            pipeline.load_ip_adapter(
                state_dict,
                subfolder=EXPRESSION_FOLDER,
                weight_name=EXPRESSION_WEIGHTS,
                image_encoder_folder=None,
                low_cpu_mem_usage=False,
            )
    except (KeyError, ValueError, RuntimeError) as error:
        raise _adapter_mismatch(file, first_line(error), models_dir, "expression") from error
    unet = pipeline.unet
    # IP-Adapter numbers every attention layer from 1 and only cross-attention ones
    # (the odd numbers) carry to_k_ip / to_v_ip.
    cross_layers = sum(not name.endswith("attn1.processor") for name in unet.attn_processors)
    wanted = {
        f"{2 * index + 1}.{projection}.weight"
        for index in range(cross_layers)
        for projection in ("to_k_ip", "to_v_ip")
    }
    unused = sorted(set(state_dict["ip_adapter"]) - wanted)
    if unused:
        problem = f"{len(unused)} ip_adapter keys match no UNet layer ({', '.join(unused[:3])})"
        raise _adapter_mismatch(file, problem, models_dir, "expression")
    shape = (1, 1, 1, EXPRESSION_DIM) if wants_token_axis(layout) else (1, 1, EXPRESSION_DIM)
    probe = torch.zeros(shape, device=unet.device, dtype=unet.dtype)
    try:
        with torch.no_grad():
            unet.encoder_hid_proj([probe])
    except RuntimeError as error:
        problem = (
            f"its projection does not take {EXPRESSION_DIM} FLAME values ({first_line(error)})"
        )
        raise _adapter_mismatch(file, problem, models_dir, "expression") from error


@contextmanager
def _quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings while loading an adapter: they are about what is checked
    strictly here anyway (unused keys) or intended (no CLIP image encoder for FLAME
    "image" embeds)."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


class _ExpressionSwitch:
    """Turns a UNet's expression adapter on and off without reloading it: once an
    IP-Adapter is loaded, diffusers' UNet insists on image embeds, but requests without
    an expression must run the plain Arc2Face UNet."""

    def __init__(self, pipeline: StableDiffusionPipeline, state_dict: dict, models_dir: Path):
        self.unet = pipeline.unet
        self._plain_processors = dict(self.unet.attn_processors)
        _load_expression_adapter(pipeline, state_dict, models_dir)
        self._adapter_processors = dict(self.unet.attn_processors)
        self._projection = self.unet.encoder_hid_proj
        self.token_axis = wants_token_axis(layout_of(state_dict["image_proj"]))
        self._enabled = True

    def enable(self, enabled: bool) -> None:
        if enabled == self._enabled:
            return
        # The projection first: a resampler's own attention layers count among the UNet's
        # processors, so the processor dict must match the UNet with or without it.
        self.unet.encoder_hid_proj = self._projection if enabled else None
        self.unet.config.encoder_hid_dim_type = "ip_image_proj" if enabled else None
        # set_attn_processor pops from the dict it is given: hand it a copy.
        processors = self._adapter_processors if enabled else self._plain_processors
        self.unet.set_attn_processor(dict(processors))
        self._enabled = enabled


@dataclass
class _Variant:
    """One UNet (Arc2Face's, or Arc2Face's with the LCM-LoRA fused) with its scheduler,
    and the pipelines that run it."""

    pipeline: StableDiffusionPipeline
    controlnet_pipeline: StableDiffusionControlNetPipeline | None
    expression: _ExpressionSwitch | None

    def pipeline_for(self, with_pose: bool) -> StableDiffusionPipeline:
        return self.controlnet_pipeline if with_pose else self.pipeline


class _LCMScheduler(LCMScheduler):
    """diffusers' LCMScheduler, whose per-step noise can be drawn ahead of the run.

    LCM injects fresh noise at every step but the last. With per-image CPU generators
    the pipeline would draw it on the host and upload it at every step; instead the
    engine draws each image's whole noise sequence up front from the same generators
    (latents first, then one draw per step, the order the pipeline uses), uploads it
    once, and hands it over with `use_noise`. The values are the same, so the images
    are too (bit-for-bit on CPU, see test_generation)."""

    _step_noise: Sequence[torch.Tensor] | None = None

    def use_noise(self, noise: Sequence[torch.Tensor] | None) -> None:
        """Per-step noise (B, C, h, w) for the next run, indexed by step; None: draw it."""
        self._step_noise = noise

    def step(self, model_output, timestep, sample, generator=None, return_dict=True):
        if self._step_noise is None:
            return super().step(model_output, timestep, sample, generator, return_dict)
        if self.step_index is None:
            self._init_step_index(timestep)
        index = self.step_index
        # Without a generator the parent draws throw-away noise on the device (no host
        # work); its denoised sample is kept and the noise step redone with ours.
        output = super().step(model_output, timestep, sample, None, return_dict=True)
        prev_sample = output.denoised
        if index != self.num_inference_steps - 1:  # as LCMScheduler.step: no noise at the end
            landing = self.timesteps[index + 1] if index + 1 < len(self.timesteps) else timestep
            alpha_prev = (
                self.alphas_cumprod[landing] if landing >= 0 else self.final_alpha_cumprod
            )
            beta_prev = 1 - alpha_prev
            noise = self._step_noise[index]
            prev_sample = alpha_prev.sqrt() * output.denoised + beta_prev.sqrt() * noise
        if not return_dict:
            return (prev_sample, output.denoised)
        return type(output)(prev_sample=prev_sample, denoised=output.denoised)


class _PerImageExpressions:
    """Pipeline mix-in: IP-Adapter embeds given one per image.

    diffusers' pipelines repeat `ip_adapter_image_embeds` batch-size times (they expect
    one adapter image for the whole batch), so B different expressions would become B*B
    rows and every image would attend to all of them. Ours are already one row per
    image, in the CFG layout the UNet takes (unconditional half first): pass them on."""

    def prepare_ip_adapter_image_embeds(
        self,
        ip_adapter_image: Any,
        ip_adapter_image_embeds: list[torch.Tensor],
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
    ) -> list[torch.Tensor]:
        return [embeds.to(device) for embeds in ip_adapter_image_embeds]


class _Arc2FacePipeline(_PerImageExpressions, StableDiffusionPipeline):
    pass


class _Arc2FaceControlNetPipeline(_PerImageExpressions, StableDiffusionControlNetPipeline):
    pass


# Arc2Face pipelines run without SD's safety checker, its feature extractor and an image
# encoder (the expression adapter feeds FLAME vectors as its image embeds).
_NO_EXTRA_PARTS: dict[str, Any] = {
    "safety_checker": None,
    "feature_extractor": None,
    "image_encoder": None,
    "requires_safety_checker": False,
}


def _build_pipeline(
    parts: dict[str, Any], unet: UNet2DConditionModel, scheduler: Any
) -> StableDiffusionPipeline:
    pipeline = _Arc2FacePipeline(
        vae=parts["vae"],
        text_encoder=parts["text_encoder"],
        tokenizer=parts["tokenizer"],
        unet=unet,
        scheduler=scheduler,
        **_NO_EXTRA_PARTS,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _build_controlnet_pipeline(
    pipeline: StableDiffusionPipeline, controlnet: ControlNetModel
) -> StableDiffusionControlNetPipeline:
    """The pose pipeline, sharing every module (and the scheduler) with `pipeline`."""
    controlnet_pipeline = _Arc2FaceControlNetPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=pipeline.unet,
        controlnet=controlnet,
        scheduler=pipeline.scheduler,
        **_NO_EXTRA_PARTS,
    )
    controlnet_pipeline.set_progress_bar_config(disable=True)
    return controlnet_pipeline


def _build_variant(
    name: str,
    unet: UNet2DConditionModel,
    parts: dict[str, Any],
    scheduler_config: dict[str, Any],
    models_dir: Path,
    adapter: dict | None,
) -> _Variant:
    """The pipelines of one UNet: "dpmsolver++" runs Arc2Face's UNet as loaded, "lcm"
    its copy with the LCM-LoRA fused in; each gets the expression adapter if asked."""
    scheduler_class = _LCMScheduler if name == "lcm" else DPMSolverMultistepScheduler
    with _quiet_diffusers():  # SD 1.5's PNDM-only keys (skip_prk_steps) are ignored
        scheduler = scheduler_class.from_config(scheduler_config)
    pipeline = _build_pipeline(parts, unet, scheduler)
    if name == "lcm":
        _fuse_lcm_lora(pipeline, models_dir)
    if unet.device.type == "cuda":  # after the LoRA fusing: the fused QKV copies the weights
        unet.fuse_qkv_projections()
    switch = _ExpressionSwitch(pipeline, adapter, models_dir) if adapter else None
    controlnet = parts.get("controlnet")
    controlnet_pipeline = _build_controlnet_pipeline(pipeline, controlnet) if controlnet else None
    return _Variant(pipeline, controlnet_pipeline, switch)


# --- request preparation -----------------------------------------------------------------


def _check_request(index: int, request: ImageRequest) -> None:
    embedding = np.asarray(request.embedding)
    if embedding.shape != (ARCFACE_DIM,):
        raise UserError(
            f"request {index}: embedding has shape {embedding.shape}: pass one ArcFace "
            f"embedding of {ARCFACE_DIM} values"
        )
    if not 0 <= int(request.seed) <= _MAX_SEED:
        raise UserError(
            f"request {index}: seed {request.seed} is outside [0, 2**64): pass a 64-bit seed"
        )
    pose = request.pose_image
    if pose is not None and not isinstance(pose, np.ndarray):
        raise UserError(
            f"request {index}: pose image is a {type(pose).__name__}: pass an HxWx3 uint8 "
            "numpy array or a PIL image"
        )
    if pose is not None and (pose.ndim != 3 or pose.shape[2] != 3 or pose.dtype != np.uint8):
        raise UserError(
            f"request {index}: pose image is {pose.dtype} {pose.shape}: pass an HxWx3 uint8 "
            "normal map (numpy array or PIL image)"
        )
    expression = request.expression
    if expression is not None:
        expression = np.asarray(expression)
        if expression.shape != (EXPRESSION_DIM,) or not np.isfinite(expression).all():
            raise UserError(
                f"request {index}: expression has shape {expression.shape} or non-finite values: "
                f"pass {EXPRESSION_DIM} FLAME values (50 expression, 2 eyelid, 3 jaw)"
            )


def _pose_batch(requests: Sequence[ImageRequest], height: int, width: int) -> torch.Tensor:
    """(B, 3, H, W) float32 in [0, 1], as diffusers' ControlNet image processor makes from
    a PIL image (uint8 / 255); images of another size are resized first."""
    images = []
    for request in requests:
        image = request.pose_image
        if image.shape[:2] != (height, width):
            shrinking = image.shape[0] > height or image.shape[1] > width
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            image = cv2.resize(image, (width, height), interpolation=interpolation)
        images.append(image)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return batch.to(torch.float32) / 255.0


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounding as the pipeline's PIL output
    does (float32 `(x * 255).round()`); on the device, so only bytes are copied back, into
    pinned memory without blocking, and the host waits once, for this copy only."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    if pixels.device.type != "cuda":
        return pixels.cpu().numpy()
    host = torch.empty(pixels.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(pixels, non_blocking=True)
    copied = torch.cuda.Event()
    copied.record()
    copied.synchronize()
    return host.numpy()


def _upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device from pinned memory without blocking the host (CPU: as is)."""
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def _draw_noise(
    seeds: Sequence[int], shape: tuple[int, ...], steps: int, dtype: torch.dtype
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Each image's initial latents and `steps` per-step noises, drawn from its own CPU
    generator in the pipeline's order (diffusers' randn_tensor: one (1, C, h, w) draw per
    image and call, in `dtype`), so a seed gives the same noise on every device."""
    latents, noise = [], [[] for _ in range(steps)]
    for seed in seeds:
        generator = torch.Generator().manual_seed(int(seed))
        latents.append(torch.randn((1, *shape), generator=generator, dtype=dtype))
        for step in range(steps):
            noise[step].append(torch.randn((1, *shape), generator=generator, dtype=dtype))
    return torch.cat(latents), [torch.cat(draws) for draws in noise]


# --- the engine ------------------------------------------------------------------------------


class Arc2FaceEngine:
    """Arc2Face's diffusion side: identity embeddings (+ pose, expression) -> images."""

    def __init__(
        self,
        conditioner: IdentityConditioner,
        variants: dict[str, _Variant],
        device: torch.device,
        max_batch_size: int | None = None,
        batch_buckets: Sequence[int] | None = None,
    ) -> None:
        self.conditioner = conditioner
        self.variants = variants
        self.device = device
        self.max_batch_size = max_batch_size
        self.batch_buckets = _buckets(batch_buckets, max_batch_size)
        # Noise drawn up front and uploaded once per batch (see _LCMScheduler); on CPU
        # the pipeline draws it itself, as it always has (same values either way).
        self.predraw_noise = device.type != "cpu"
        base = variants["dpmsolver++"]
        self.has_controlnet = base.controlnet_pipeline is not None
        self.has_expression = base.expression is not None

    @classmethod
    def from_pretrained(
        cls,
        models_dir: str | os.PathLike,
        device: str | torch.device = "auto",
        precision: str = "auto",
        controlnet: bool = False,
        expression: bool = False,
        lcm: bool = False,
        compile: bool = False,
        max_batch_size: int | None = None,
        batch_buckets: Sequence[int] | None = None,
        compile_backend: str | Callable = "inductor",
    ) -> Arc2FaceEngine:
        """Load the models directory with the strict loaders. `lcm` adds a second UNet
        with the LCM-LoRA fused in, used by `GenerationSettings.lcm()` calls only (so
        dpmsolver++ calls of the same engine still get Arc2Face's own UNet). `compile`
        wraps the UNet(s), ControlNet and VAE decoder in torch.compile (with
        `compile_backend`); `max_batch_size` caps how many images one GPU forward takes;
        `batch_buckets` are the forward sizes a smaller GPU batch is padded up to, so a
        compiled model meets a fixed set of shapes (padded images are dropped)."""
        models_dir = Path(models_dir)
        torch_device = resolve_device(device)
        dtype = resolve_dtype(precision, torch_device)
        parts = _load_parts(models_dir, dtype, controlnet)
        _to_device(parts, torch_device)
        scheduler_config = loading.load_scheduler_config(models_dir)
        adapter = _read_expression_adapter(models_dir) if expression else None
        # The LCM UNet is copied before anything is attached to Arc2Face's own UNet.
        unets = {"dpmsolver++": parts["unet"]}
        if lcm:
            unets["lcm"] = copy.deepcopy(parts["unet"])
        variants = {
            name: _build_variant(name, unet, parts, scheduler_config, models_dir, adapter)
            for name, unet in unets.items()
        }
        if torch_device.type == "cuda":  # fused QKV changes the rounding: GPU only
            for name in ("controlnet", "vae"):
                if name in parts:
                    parts[name].fuse_qkv_projections()
        if compile:
            modules = [*unets.values(), parts.get("controlnet"), parts["vae"].decoder]
            for module in modules:
                if module is not None:
                    # Static shapes: the buckets bound how many a model meets.
                    module.compile(backend=compile_backend, dynamic=False)
        conditioner = IdentityConditioner(parts["text_encoder"], parts["tokenizer"])
        return cls(conditioner, variants, torch_device, max_batch_size, batch_buckets)

    # -- public API --

    def encode_identities(self, embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
        """ArcFace embeddings (B, 512) -> prompt_embeds (B, 77, D), in one forward."""
        if not isinstance(embeddings, torch.Tensor):
            embeddings = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
        return self.conditioner.encode(embeddings)

    def generate(
        self, requests: Sequence[ImageRequest], settings: GenerationSettings = GenerationSettings()
    ) -> np.ndarray:
        """Images (B, H, W, 3) uint8 RGB, in request order; image i depends only on
        request i and `settings`."""
        self._check_settings(settings)
        for index, request in enumerate(requests):
            self._check_controls(index, request)
            _check_request(index, request)
        images = np.empty((len(requests), settings.height, settings.width, 3), dtype=np.uint8)
        with self._cpu_threads():
            for indices in self._batches(requests):
                batch = [requests[index] for index in indices]
                images[indices] = self._generate_batch(batch, settings)
        return images

    def _cpu_threads(self) -> AbstractContextManager[None]:
        """Pin torch's intra-op threads on CPU: elementwise kernels take their vectorised
        or scalar path depending on how the work is split across threads (SiLU differs in
        the last bit), so a fixed count keeps images bit-identical whatever the machine's
        core count or task runner (Dask workers start with one thread)."""
        return pinned_cpu_threads(self.device)

    # -- internals --

    def _check_settings(self, settings: GenerationSettings) -> None:
        if settings.scheduler not in self.variants:
            raise UserError(
                f"settings use the {settings.scheduler} scheduler but the engine was loaded "
                f"without it: load the engine with lcm=True"
            )

    def _check_controls(self, index: int, request: ImageRequest) -> None:
        if request.pose_image is not None and not self.has_controlnet:
            raise UserError(
                f"request {index} has a pose image but the engine has no ControlNet: "
                "load the engine with controlnet=True"
            )
        if request.expression is not None and not self.has_expression:
            raise UserError(
                f"request {index} has an expression but the engine has no expression adapter: "
                "load the engine with expression=True"
            )

    def _batches(self, requests: Sequence[ImageRequest]) -> list[list[int]]:
        """Request indices grouped by the pipeline they need, cut into forward batches."""
        groups: dict[tuple[bool, bool], list[int]] = {}
        for index, request in enumerate(requests):
            key = (request.pose_image is not None, request.expression is not None)
            groups.setdefault(key, []).append(index)
        size = _CPU_MICRO_BATCH if self.device.type == "cpu" else self.max_batch_size
        batches = []
        for indices in groups.values():
            step = size or len(indices)
            batches += [indices[start : start + step] for start in range(0, len(indices), step)]
        return batches

    def _bucket(self, size: int) -> int:
        """The forward size a batch of `size` runs at: itself when the engine runs one
        request per call (CPU) or has no buckets, else the smallest bucket that holds it."""
        if self.device.type == "cpu" and _CPU_MICRO_BATCH is not None:
            return size
        return next((bucket for bucket in self.batch_buckets if bucket >= size), size)

    def _generate_batch(
        self, requests: Sequence[ImageRequest], settings: GenerationSettings
    ) -> np.ndarray:
        """One pipeline call; every request of `requests` needs the same pipeline. A
        batch smaller than its bucket is padded with copies of its last request, whose
        images are dropped."""
        count = len(requests)
        requests = [*requests, *[requests[-1]] * (self._bucket(count) - count)]
        return self._run_pipeline(requests, settings)[:count]

    def _run_pipeline(
        self, requests: Sequence[ImageRequest], settings: GenerationSettings
    ) -> np.ndarray:
        with_pose = requests[0].pose_image is not None
        with_expression = requests[0].expression is not None
        variant = self.variants[settings.scheduler]
        if variant.expression is not None:
            variant.expression.enable(with_expression)
        pipeline = variant.pipeline_for(with_pose)

        embeddings = np.stack([np.asarray(r.embedding, dtype=np.float32) for r in requests])
        prompt_embeds = self.conditioner.encode(torch.from_numpy(embeddings))
        arguments: dict[str, Any] = {
            "prompt_embeds": prompt_embeds,
            "num_inference_steps": settings.num_inference_steps,
            "guidance_scale": settings.guidance_scale,
            "height": settings.height,
            "width": settings.width,
            "output_type": "pt",
            **self._noise(pipeline, requests, settings),
        }
        if settings.uses_guidance:
            unconditional = self.conditioner.unconditional()
            arguments["negative_prompt_embeds"] = unconditional.expand(len(requests), -1, -1)
        if with_pose:
            pose = _pose_batch(requests, settings.height, settings.width)
            arguments["image"] = _upload(pose, self.device)
            arguments["controlnet_conditioning_scale"] = settings.controlnet_scale
        if with_expression:
            pipeline.set_ip_adapter_scale(settings.expression_scale)
            arguments["ip_adapter_image_embeds"] = [
                self._expression_embeds(requests, settings.uses_guidance)
            ]
        try:
            images = pipeline(**arguments).images
        finally:
            if isinstance(pipeline.scheduler, _LCMScheduler):
                pipeline.scheduler.use_noise(None)  # this call's noise only
        return _to_uint8(images)

    def _noise(
        self, pipeline: StableDiffusionPipeline, requests: Sequence[ImageRequest],
        settings: GenerationSettings,
    ) -> dict[str, Any]:
        """The pipeline's noise arguments. CPU generators: the same seed gives the same
        noise on every device. On an accelerator the noise is drawn here, all steps at
        once, and uploaded in one copy instead of once per step."""
        scheduler = pipeline.scheduler
        if not self.predraw_noise:
            return {"generator": [torch.Generator().manual_seed(int(r.seed)) for r in requests]}
        unet = pipeline.unet
        factor = 2 ** (len(pipeline.vae.config.block_out_channels) - 1)
        shape = (unet.config.in_channels, settings.height // factor, settings.width // factor)
        lcm = isinstance(scheduler, _LCMScheduler)
        noisy_steps = settings.num_inference_steps - 1 if lcm else 0
        latents, noise = _draw_noise([r.seed for r in requests], shape, noisy_steps, unet.dtype)
        if lcm:
            scheduler.use_noise([_upload(step, self.device) for step in noise])
        return {"latents": _upload(latents, self.device)}

    def _expression_embeds(self, requests: Sequence[ImageRequest], guidance: bool) -> torch.Tensor:
        """(B, 1, 55), or (2B, 1, 55) under classifier-free guidance with the
        unconditional half (first, as the pipeline chunks it) all zeros; (B, 1, 1, 55) for
        projections that take a token sequence (adapter_layouts.wants_token_axis)."""
        values = np.stack([np.asarray(r.expression, dtype=np.float32) for r in requests])
        embeds = torch.from_numpy(values)[:, None, :]
        if self.variants["dpmsolver++"].expression.token_axis:
            embeds = embeds[:, :, None, :]
        if guidance:
            embeds = torch.cat([torch.zeros_like(embeds), embeds])
        unet = self.variants["dpmsolver++"].pipeline.unet
        return _upload(embeds.to(dtype=unet.dtype), self.device)


def _buckets(buckets: Sequence[int] | None, max_batch_size: int | None) -> list[int]:
    """Sorted bucket sizes, the largest batch included; none without buckets."""
    if not buckets:
        return []
    sizes = sorted({int(bucket) for bucket in buckets} | ({max_batch_size} if max_batch_size else set()))
    if sizes[0] < 1:
        raise UserError(f"batch buckets {sizes} hold a size below 1: use sizes >= 1")
    return sizes


def _load_parts(models_dir: Path, dtype: torch.dtype, controlnet: bool) -> dict[str, Any]:
    parts = {
        "unet": loading.load_unet(models_dir, dtype),
        "vae": loading.load_vae(models_dir, dtype),
        "text_encoder": loading.load_text_encoder(models_dir, dtype),
        "tokenizer": loading.load_tokenizer(models_dir),
    }
    if controlnet:
        parts["controlnet"] = loading.load_controlnet(models_dir, dtype)
    return parts


def _to_device(parts: dict[str, Any], device: torch.device) -> None:
    for name, part in parts.items():
        if isinstance(part, torch.nn.Module):
            parts[name] = part.to(device)
    if device.type == "cuda":
        # Convolutions run fastest in NHWC on tensor cores; cuDNN picks the fastest
        # algorithm per shape once (GPU results are not batch-invariant anyway).
        torch.backends.cudnn.benchmark = True
        for name in ("unet", "vae", "controlnet"):
            if name in parts:
                parts[name].to(memory_format=torch.channels_last)
