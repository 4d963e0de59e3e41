"""Strict loading of the models directory's checkpoints.

diffusers and transformers both load a checkpoint that does not fit the model: missing
weights are randomly initialised, unknown ones dropped, and with `ignore_mismatched_sizes`
wrong shapes re-initialised, each with a log line that is easy to miss. An Arc2Face run
on a half-random UNet produces plausible-looking noise for hours, so every loader here
asks the library for its loading report and refuses anything but a perfect fit.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path
from typing import Any

import torch
import transformers
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors import SafetensorError
from transformers import CLIPTextModel, CLIPTokenizer

from arc2face_engine.models_dir import fetch_hint, require
from schemas.errors import CheckpointMismatch, UserError, first_line

# Errors the libraries raise for a file they cannot parse (truncated, not JSON, not a
# checkpoint); anything else is a bug and propagates unchanged.
_UNREADABLE = (OSError, ValueError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)
_KEYS_SHOWN = 3
# transformers renamed from_pretrained's `torch_dtype` to `dtype` in 4.56.
_TRANSFORMERS_DTYPE_KWARG = (
    "dtype"
    if tuple(map(int, transformers.__version__.split(".")[:2])) >= (4, 56)
    else "torch_dtype"
)


def _redownload_hint(root: str | os.PathLike, component: str) -> str:
    return f"re-download: {fetch_hint(root, component)}"


def _unreadable(
    file: Path, root: str | os.PathLike, component: str, error: BaseException
) -> CheckpointMismatch:
    return CheckpointMismatch(
        f"cannot read {file} ({first_line(error)}): the file is corrupt or from another "
        f"model; {_redownload_hint(root, component)}"
    )


def _check_loading_info(
    info: dict[str, Any], file: Path, root: str | os.PathLike, component: str
) -> None:
    """Raise CheckpointMismatch unless the loading report says every weight fitted."""
    problems = []
    for label, field in (("missing", "missing_keys"), ("unexpected", "unexpected_keys")):
        keys = sorted(info.get(field) or ())
        if keys:
            problems.append(f"{len(keys)} {label} keys ({', '.join(keys[:_KEYS_SHOWN])})")
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda entry: entry[0])
    if mismatched:
        shown = ", ".join(
            f"{key} {tuple(found)} vs {tuple(expected)}"
            for key, found, expected in mismatched[:_KEYS_SHOWN]
        )
        problems.append(f"{len(mismatched)} shape-mismatched keys ({shown})")
    if info.get("error_msgs"):
        problems.append(str(info["error_msgs"][0]).strip().splitlines()[0])
    if problems:
        raise CheckpointMismatch(
            f"{file} does not fit its model: {'; '.join(problems)}; the file is corrupt or "
            f"from another model; {_redownload_hint(root, component)}"
        )


def _strict_from_pretrained(
    model_class: type,
    root: str | os.PathLike,
    subfolder: str,
    weights: str,
    component: str,
    **kwargs: Any,
) -> Any:
    """`model_class.from_pretrained(folder)` through the library's own loading path,
    with shape mismatches reported instead of raised so that all problems are named."""
    require(root, component, under=subfolder)
    folder = Path(root) / subfolder
    try:
        model, info = model_class.from_pretrained(
            folder, output_loading_info=True, ignore_mismatched_sizes=True, **kwargs
        )
    except (UserError, torch.OutOfMemoryError):
        raise
    except _UNREADABLE as error:
        raise _unreadable(folder / weights, root, component, error) from error
    _check_loading_info(info, folder / weights, root, component)
    return model.eval()


def _load_diffusers_model(
    model_class: type, root: str | os.PathLike, subfolder: str, component: str, dtype: torch.dtype
) -> Any:
    return _strict_from_pretrained(
        model_class,
        root,
        subfolder,
        "diffusion_pytorch_model.safetensors",
        component,
        torch_dtype=dtype,
        use_safetensors=True,
    )


def load_unet(root: str | os.PathLike, dtype: torch.dtype) -> UNet2DConditionModel:
    """Arc2Face's UNet (arc2face/)."""
    return _load_diffusers_model(UNet2DConditionModel, root, "arc2face", "core", dtype)


def load_vae(root: str | os.PathLike, dtype: torch.dtype) -> AutoencoderKL:
    """Stable Diffusion 1.5's VAE (vae/)."""
    return _load_diffusers_model(AutoencoderKL, root, "vae", "core", dtype)


def load_controlnet(root: str | os.PathLike, dtype: torch.dtype) -> ControlNetModel:
    """Arc2Face's pose ControlNet (controlnet/)."""
    return _load_diffusers_model(ControlNetModel, root, "controlnet", "controlnet", dtype)


def load_text_encoder(root: str | os.PathLike, dtype: torch.dtype) -> CLIPTextModel:
    """Arc2Face's CLIP text encoder (encoder/): a transformers-4.36 `pytorch_model.bin`
    whose keys start with `text_model.`; transformers 5 maps them onto its flatter class."""
    return _strict_from_pretrained(
        CLIPTextModel,
        root,
        "encoder",
        "pytorch_model.bin",
        "core",
        use_safetensors=False,
        **{_TRANSFORMERS_DTYPE_KWARG: dtype},
    )


def load_tokenizer(root: str | os.PathLike) -> CLIPTokenizer:
    """Stable Diffusion 1.5's CLIP tokenizer (tokenizer/)."""
    require(root, "core", under="tokenizer")
    folder = Path(root) / "tokenizer"
    try:
        return CLIPTokenizer.from_pretrained(folder)
    except _UNREADABLE as error:
        raise _unreadable(folder, root, "core", error) from error


def load_scheduler_config(root: str | os.PathLike) -> dict[str, Any]:
    """Stable Diffusion 1.5's scheduler config (scheduler/scheduler_config.json), as a dict
    that any diffusers scheduler's `from_config` accepts."""
    require(root, "core", under="scheduler")
    path = Path(root) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise _unreadable(path, root, "core", error) from error
    if not isinstance(config, dict) or "num_train_timesteps" not in config:
        raise CheckpointMismatch(
            f"{path} is not a diffusers scheduler config (no num_train_timesteps): "
            f"{_redownload_hint(root, 'core')}"
        )
    return config
