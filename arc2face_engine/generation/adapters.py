"""The adapters Arc2Face adds to its UNet, loaded strictly: the LCM-LoRA (fused into a copy
of the UNet) and the Expression Adapter (an IP-Adapter fed FLAME values), loaded onto a
second view of the UNet that shares its weights (`weight_sharing_copy`), so requests
without an expression run the plain UNet and neither view ever changes.

diffusers only warns about keys that match nothing; here every key must fit, or the
file is refused naming it and the command that fetches it again.
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import (
    StableDiffusionPipeline,
)
from diffusers.utils import convert_unet_state_dict_to_peft
from diffusers.utils import logging as diffusers_logging
from peft import get_peft_model_state_dict
from safetensors import SafetensorError

from arc2face_engine.generation.adapter_layouts import layout_of, unusable_reason, wants_token_axis
from arc2face_engine.models_dir import fetch_hint, require
from schemas.constants import EXPRESSION_DIM  # FLAME: 50 expression + 2 eyelid + 3 jaw
from schemas.errors import CheckpointMismatch, first_line

LCM_LORA_FOLDER = "lcm-lora"
LCM_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
LCM_ADAPTER_NAME = "lcm"
EXPRESSION_FOLDER = "exp_adapter"
EXPRESSION_WEIGHTS = "exp_adapter.bin"


# --- strict adapter loading ------------------------------------------------------------------


def _adapter_mismatch(
    file: Path, problem: str, models_dir: Path, component: str
) -> CheckpointMismatch:
    return CheckpointMismatch(
        f"{file} does not fit Arc2Face's UNet: {problem}; the file is corrupt or from another "
        f"model; re-download: {fetch_hint(models_dir, component)}"
    )


def fuse_lcm_lora(pipeline: StableDiffusionPipeline, models_dir: Path) -> None:
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
        with quiet_diffusers():
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


def read_expression_adapter(models_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
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


def load_expression_adapter(
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
        with quiet_diffusers():
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
def quiet_diffusers() -> Iterator[None]:
    """Silence diffusers' warnings while loading an adapter: they are about what is checked
    strictly here anyway (unused keys) or intended (no CLIP image encoder for FLAME
    "image" embeds)."""
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)


@dataclass(frozen=True)
class ExpressionAdapter:
    """The expression adapter as loaded on its UNet view: its FLAME projection and whether
    that projection takes a token axis (adapter_layouts.wants_token_axis)."""

    projection: torch.nn.Module
    token_axis: bool


def weight_sharing_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of `module`'s structure that shares every parameter and buffer with it.

    Requests with and without an expression run two views of one UNet: the plain one
    (Arc2Face's own attention processors, no projection) and this copy with the
    IP-Adapter loaded. Switching one UNet's processors back and forth would change
    attributes a compiled graph is guarded on, so every switch would recompile it; two
    views are two modules, each compiled once, and cost no extra weights."""
    shared = {id(tensor): tensor for tensor in (*module.parameters(), *module.buffers())}
    return copy.deepcopy(module, shared)


def attach_expression_adapter(
    pipeline: StableDiffusionPipeline, state_dict: dict, models_dir: Path
) -> ExpressionAdapter:
    """Load the expression adapter onto `pipeline.unet` (a `weight_sharing_copy`)."""
    load_expression_adapter(pipeline, state_dict, models_dir)
    return ExpressionAdapter(
        pipeline.unet.encoder_hid_proj, wants_token_axis(layout_of(state_dict["image_proj"]))
    )
