"""The diffusers pipelines a UNet runs in: plain and with the pose ControlNet, both taking
one expression per image, with the LCM scheduler whose per-step noise can be drawn ahead.
`build_variant` assembles them for one UNet (Arc2Face's own, or its LCM copy)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    ControlNetModel,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from arc2face_engine.generation.adapters import (
    ExpressionAdapter,
    attach_expression_adapter,
    fuse_lcm_lora,
    quiet_diffusers,
    weight_sharing_copy,
)


@dataclass
class UNetVariant:
    """One UNet (Arc2Face's, or Arc2Face's with the LCM-LoRA fused) with its scheduler,
    and the pipelines that run it, by (with pose, with expression). With the expression
    adapter, expression pipelines run a view of the UNet that shares its weights and
    carries the adapter (adapters.weight_sharing_copy); the others run the plain UNet."""

    pipelines: dict[tuple[bool, bool], StableDiffusionPipeline]
    expression: ExpressionAdapter | None

    @property
    def pipeline(self) -> StableDiffusionPipeline:
        """The plain pipeline (no pose, no expression)."""
        return self.pipelines[False, False]

    @property
    def controlnet_pipeline(self) -> StableDiffusionControlNetPipeline | None:
        return self.pipelines.get((True, False))

    @property
    def expression_unet(self) -> UNet2DConditionModel | None:
        return self.pipelines[False, True].unet if self.expression else None

    def pipeline_for(self, with_pose: bool, with_expression: bool) -> StableDiffusionPipeline:
        return self.pipelines[with_pose, with_expression]


class NoiseAheadLCMScheduler(LCMScheduler):
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


def build_variant(
    name: str,
    unet: UNet2DConditionModel,
    parts: dict[str, Any],
    scheduler_config: dict[str, Any],
    models_dir: Path,
    adapter: dict | None,
) -> UNetVariant:
    """The pipelines of one UNet: "dpmsolver++" runs Arc2Face's UNet as loaded, "lcm"
    its copy with the LCM-LoRA fused in; each gets the expression adapter if asked (on its
    own weight-sharing view of the UNet), and the pose ControlNet if loaded. All pipelines
    of a variant share one scheduler."""
    scheduler_class = NoiseAheadLCMScheduler if name == "lcm" else DPMSolverMultistepScheduler
    with quiet_diffusers():  # SD 1.5's PNDM-only keys (skip_prk_steps) are ignored
        scheduler = scheduler_class.from_config(scheduler_config)
    pipeline = _build_pipeline(parts, unet, scheduler)
    if name == "lcm":
        fuse_lcm_lora(pipeline, models_dir)
    if unet.device.type == "cuda":  # after the LoRA fusing: the fused QKV copies the weights
        unet.fuse_qkv_projections()
    pipelines = {(False, False): pipeline}
    expression = None
    if adapter:
        expression_pipeline = _build_pipeline(parts, weight_sharing_copy(unet), scheduler)
        expression = attach_expression_adapter(expression_pipeline, adapter, models_dir)
        pipelines[False, True] = expression_pipeline
    controlnet = parts.get("controlnet")
    if controlnet is not None:
        for with_expression in (False, True):
            if (False, with_expression) in pipelines:
                without_pose = pipelines[False, with_expression]
                pipelines[True, with_expression] = _build_controlnet_pipeline(
                    without_pose, controlnet
                )
    return UNetVariant(pipelines, expression)
