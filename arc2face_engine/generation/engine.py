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
import os
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import (
    StableDiffusionPipeline,
)

from arc2face_engine.determinism import pinned_cpu_threads
from arc2face_engine.generation import checkpoints
from arc2face_engine.generation.adapters import read_expression_adapter
from arc2face_engine.generation.compiling import CompileWatch, raise_recompile_limit
from arc2face_engine.generation.conditioning import ARCFACE_DIM, IdentityConditioner
from arc2face_engine.generation.devices import resolve_device, resolve_dtype
from arc2face_engine.generation.pipelines import NoiseAheadLCMScheduler, UNetVariant, build_variant
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from arc2face_engine.transfers import to_device, to_host
from schemas.constants import EXPRESSION_DIM  # FLAME: 50 expression + 2 eyelid + 3 jaw
from schemas.errors import UserError

_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes any 64-bit value
COMPILE_BACKEND = "inductor"  # torch.compile's default; tests use "eager" / "aot_eager"
# Compiled graphs one warmed-up (settings, controls, bucket) adds at most: the UNet (one
# view, one call signature), the ControlNet and the VAE decoder.
_GRAPHS_PER_BUCKET = 3

# torch's CPU kernels are not batch-invariant: oneDNN picks its convolution algorithm by
# batch size (a 3x3 conv of batch 1 and of batch 8 differ in the last bit), and MKL's
# sgemm takes another code path for very few rows (the timestep MLP, the IP-Adapter
# projection: 2 rows vs 16 differ). Turning oneDNN off makes convolutions ~2.7x slower
# and still leaves the sgemm path, while one request per pipeline call costs little at
# real sizes: a CPU is already saturated by a single 512x512 image. So on CPU every request runs
# alone (its CFG pair is always the same 2-row batch); GPUs keep full batches.
_CPU_MICRO_BATCH = 1


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
            import cv2  # only here: the GPU command's bare image has no OpenCV

            shrinking = image.shape[0] > height or image.shape[1] > width
            interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
            image = cv2.resize(image, (width, height), interpolation=interpolation)
        images.append(image)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    return batch.to(torch.float32) / 255.0


def _to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [0, 1] -> (B, H, W, 3) uint8, rounding as the pipeline's PIL output
    does (float32 `(x * 255).round()`); on the device, so only bytes are copied back, into
    pinned memory on the images' own device, and the host waits for this copy only."""
    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    return to_host(pixels)


def _upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host -> device from pinned memory without blocking the host (CPU: as is)."""
    return to_device(tensor, device)


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
        variants: dict[str, UNetVariant],
        device: torch.device,
        max_batch_size: int | None = None,
        batch_buckets: Sequence[int] | None = None,
        compile_watch: CompileWatch | None = None,
    ) -> None:
        self.conditioner = conditioner
        self.variants = variants
        self.device = device
        self.max_batch_size = max_batch_size
        self.batch_buckets = _buckets(batch_buckets, max_batch_size)
        # Noise drawn up front and uploaded once per batch (see NoiseAheadLCMScheduler); on CPU
        # the pipeline draws it itself, as it always has (same values either way).
        self.predraw_noise = device.type != "cpu"
        base = variants["dpmsolver++"]
        self.has_controlnet = base.controlnet_pipeline is not None
        self.has_expression = base.expression is not None
        self.compile_watch = compile_watch
        self._warmed: set[tuple] = set()  # (settings, pose, expression, bucket) compiled

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
        compile_backend: str | Callable | None = None,
    ) -> Arc2FaceEngine:
        """Load the models directory with the strict loaders. `lcm` adds a second UNet
        with the LCM-LoRA fused in, used by `GenerationSettings.lcm()` calls only (so
        dpmsolver++ calls of the same engine still get Arc2Face's own UNet). `compile`
        wraps the UNet(s), ControlNet and VAE decoder in torch.compile (with
        `compile_backend`, default COMPILE_BACKEND), each module its own compiled
        callable, compiled by `warm_up`; `max_batch_size` caps how many images one GPU
        forward takes; `batch_buckets` are the forward sizes a smaller GPU batch is padded
        up to, so a compiled model meets a fixed set of shapes (padded images are
        dropped)."""
        models_dir = Path(models_dir)
        torch_device = resolve_device(device)
        dtype = resolve_dtype(precision, torch_device)
        parts = _load_parts(models_dir, dtype, controlnet)
        _to_device(parts, torch_device)
        scheduler_config = checkpoints.load_scheduler_config(models_dir)
        adapter = read_expression_adapter(models_dir) if expression else None
        # The LCM UNet is copied before anything is attached to Arc2Face's own UNet.
        unets = {"dpmsolver++": parts["unet"]}
        if lcm:
            unets["lcm"] = copy.deepcopy(parts["unet"])
        variants = {
            name: build_variant(name, unet, parts, scheduler_config, models_dir, adapter)
            for name, unet in unets.items()
        }
        if torch_device.type == "cuda":  # fused QKV changes the rounding: GPU only
            for name in ("controlnet", "vae"):
                if name in parts:
                    parts[name].fuse_qkv_projections()
        watch = None
        if compile:
            watch = CompileWatch(compile_backend or COMPILE_BACKEND)
            for label, module in _compiled_modules(variants, parts).items():
                watch.compile(module, label)
        conditioner = IdentityConditioner(parts["text_encoder"], parts["tokenizer"])
        return cls(conditioner, variants, torch_device, max_batch_size, batch_buckets, watch)

    # -- public API --

    def encode_identities(self, embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
        """ArcFace embeddings (B, 512) -> prompt_embeds (B, 77, D), in one forward."""
        if not isinstance(embeddings, torch.Tensor):
            embeddings = torch.from_numpy(np.asarray(embeddings, dtype=np.float32))
        return self.conditioner.encode(embeddings)

    def warm_up(
        self,
        batch_sizes: Iterable[int],
        settings: GenerationSettings,
        with_pose: bool = False,
        with_expression: bool = False,
    ) -> None:
        """Compile now, for `settings` and these controls, every graph that batches of
        `batch_sizes` images will run: one pipeline call per bucket they meet (largest
        first), with one denoising step (the UNet's shapes do not depend on the count).
        Once per (settings, controls, bucket): later calls return at once. Without compile
        it does nothing (eager modules need no warm-up)."""
        if self.compile_watch is None:
            return
        key = (replace(settings, num_inference_steps=1), with_pose, with_expression)
        buckets = sorted({self._forward_size(size) for size in batch_sizes if size > 0}, reverse=True)
        todo = [bucket for bucket in buckets if (*key, bucket) not in self._warmed]
        if not todo:
            return
        raise_recompile_limit(_GRAPHS_PER_BUCKET * (len(self._warmed) + len(todo)) + 8)
        request = _warm_up_request(settings, with_pose, with_expression)
        try:
            with self._cpu_threads():
                for bucket in todo:
                    self.compile_watch.warming_up = bucket
                    self._run_pipeline([request] * bucket, key[0])
                    self._warmed.add((*key, bucket))
        finally:
            self.compile_watch.warming_up = None

    def compile_problems(self) -> list[str]:
        """One line per problem dynamo reported since loading (a fallback to eager, a graph
        break, a compile after warm-up); empty when all is well or nothing is compiled."""
        return self.compile_watch.problems() if self.compile_watch else []

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

    def _forward_size(self, size: int) -> int:
        """How many images one forward of a batch of `size` holds (CPU: one at a time)."""
        if self.device.type == "cpu" and _CPU_MICRO_BATCH is not None:
            return _CPU_MICRO_BATCH
        return self._bucket(size)

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
        pipeline = self.variants[settings.scheduler].pipeline_for(with_pose, with_expression)

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
            if isinstance(pipeline.scheduler, NoiseAheadLCMScheduler):
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
        lcm = isinstance(scheduler, NoiseAheadLCMScheduler)
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


def _warm_up_request(settings: GenerationSettings, with_pose: bool, with_expression: bool):
    """A request of the given controls for warm-up runs (its image is thrown away)."""
    embedding = np.zeros(ARCFACE_DIM, np.float32)
    embedding[0] = 1.0
    pose = np.full((settings.height, settings.width, 3), 127, np.uint8) if with_pose else None
    expression = np.zeros(EXPRESSION_DIM, np.float32) if with_expression else None
    return ImageRequest(embedding, 0, pose_image=pose, expression=expression)


def _compiled_modules(
    variants: dict[str, UNetVariant], parts: dict[str, Any]
) -> dict[str, torch.nn.Module]:
    """Every module a compiled engine compiles, by label: each UNet view (Arc2Face's, its
    expression view, the LCM ones), the ControlNet and the VAE decoder."""
    modules = {}
    for name, variant in variants.items():
        prefix = "" if name == "dpmsolver++" else f"{name} "
        modules[f"{prefix}unet"] = variant.pipeline.unet
        if variant.expression_unet is not None:
            modules[f"{prefix}unet+expression"] = variant.expression_unet
    if parts.get("controlnet") is not None:
        modules["controlnet"] = parts["controlnet"]
    modules["vae decoder"] = parts["vae"].decoder
    return modules


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
        "unet": checkpoints.load_unet(models_dir, dtype),
        "vae": checkpoints.load_vae(models_dir, dtype),
        "text_encoder": checkpoints.load_text_encoder(models_dir, dtype),
        "tokenizer": checkpoints.load_tokenizer(models_dir),
    }
    if controlnet:
        parts["controlnet"] = checkpoints.load_controlnet(models_dir, dtype)
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
