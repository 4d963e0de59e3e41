"""Which device and dtype the engine runs at: `auto` resolved to what this machine has."""

from __future__ import annotations

import torch

from schemas.errors import UserError

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


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
