"""The models directory's configs checked against what they configure, without loading
a weight: run by preflight, before a job writes anything.

- The scheduler config (`scheduler/scheduler_config.json`) builds every scheduler the
  job uses and sets the job's step count (a config without `num_train_timesteps`, or
  with a beta schedule diffusers does not know, fails here).
- Each diffusers model's `config.json` (UNet, VAE, ControlNet) builds the model on the
  meta device (no memory), and the tensor names and shapes it expects are compared with
  those its safetensors header lists, after diffusers' own renaming of old attention
  keys: what the strict loader (checkpoints.py) would refuse inside the first shard is
  refused here.

Each failure is a CheckpointMismatch naming the files and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from arc2face_engine.models_dir import fetch_hint
from schemas.errors import CheckpointMismatch, first_line

WEIGHTS = "diffusion_pytorch_model.safetensors"
_KEYS_SHOWN = 3
# (folder, models-directory component, diffusers class name) of each diffusers model.
DIFFUSERS_MODELS = {
    "unet": ("arc2face", "core", "UNet2DConditionModel"),
    "vae": ("vae", "core", "AutoencoderKL"),
    "controlnet": ("controlnet", "controlnet", "ControlNetModel"),
}


def check_model_configs(
    root: str | os.PathLike, components: list[str], lcm: bool, steps: int
) -> None:
    """Every config the job's components use, checked (see the module docstring)."""
    check_scheduler_config(root, lcm, steps)
    for name, (_, component, _) in DIFFUSERS_MODELS.items():
        if component in components:
            check_config_fits_weights(root, name)


def check_scheduler_config(root: str | os.PathLike, lcm: bool, steps: int) -> None:
    """Build the job's schedulers from the config and set `steps` on each."""
    from diffusers import DPMSolverMultistepScheduler, LCMScheduler
    from diffusers.utils import logging as diffusers_logging

    from arc2face_engine.generation.checkpoints import load_scheduler_config

    config = load_scheduler_config(root)  # refuses a config without num_train_timesteps
    path = Path(root) / "scheduler" / "scheduler_config.json"
    for scheduler_class in (DPMSolverMultistepScheduler, *((LCMScheduler,) if lcm else ())):
        verbosity = diffusers_logging.get_verbosity()
        diffusers_logging.set_verbosity_error()  # SD 1.5's PNDM-only keys are ignored
        try:
            scheduler = scheduler_class.from_config(config)
            scheduler.set_timesteps(steps)
        except Exception as error:  # diffusers raises ValueError, NotImplementedError, ...
            raise CheckpointMismatch(
                f"{path} does not configure {scheduler_class.__name__} for {steps} steps "
                f"({first_line(error)}): {fetch_hint(root, 'core')} to fetch it again"
            ) from None
        finally:
            diffusers_logging.set_verbosity(verbosity)


def check_config_fits_weights(root: str | os.PathLike, name: str) -> None:
    """`config.json` of model `name` (a key of DIFFUSERS_MODELS) against its weights."""
    import diffusers
    import torch
    from safetensors import safe_open

    folder, component, class_name = DIFFUSERS_MODELS[name]
    directory = Path(root) / folder
    model_class = getattr(diffusers, class_name)
    hint = f"{fetch_hint(root, component)} to fetch both again"
    try:
        config = model_class.load_config(directory)
        with torch.device("meta"):
            model = model_class.from_config(config)
    except Exception as error:  # a config diffusers cannot build a model from
        raise CheckpointMismatch(
            f"{directory / 'config.json'} does not describe a {class_name} "
            f"({first_line(error)}): {hint}"
        ) from None
    expected = {key: tuple(value.shape) for key, value in model.state_dict().items()}
    with safe_open(str(directory / WEIGHTS), framework="pt") as handle:
        names = handle.keys()  # the header only: no tensor is read
        found = {key: tuple(handle.get_slice(key).get_shape()) for key in names}
    fix_keys = getattr(model, "_fix_state_dict_keys_on_load", None)
    if fix_keys is not None:  # the renaming diffusers applies when it loads the file
        fix_keys(found)
    problems = _differences(expected, found, model_class)
    if problems:
        raise CheckpointMismatch(
            f"{directory / 'config.json'} does not fit {directory / WEIGHTS}: "
            f"{'; '.join(problems)}; the config and the weights come from different models: "
            f"{hint}"
        )


def _differences(
    expected: dict[str, tuple], found: dict[str, tuple], model_class: type
) -> list[str]:
    import re

    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    for pattern in getattr(model_class, "_keys_to_ignore_on_load_unexpected", None) or ():
        unexpected = [key for key in unexpected if re.search(pattern, key) is None]
    mismatched = sorted(key for key in set(expected) & set(found) if expected[key] != found[key])
    problems = []
    if mismatched:
        shown = ", ".join(
            f"{key} {found[key]} in the file vs {expected[key]} from the config"
            for key in mismatched[:_KEYS_SHOWN]
        )
        problems.append(f"{len(mismatched)} tensors of another shape ({shown})")
    for label, keys in (("missing from the file", missing), ("not in the config", unexpected)):
        if keys:
            problems.append(f"{len(keys)} tensors {label} ({', '.join(keys[:_KEYS_SHOWN])})")
    return problems
