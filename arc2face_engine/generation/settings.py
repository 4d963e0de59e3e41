"""How images are sampled (`GenerationSettings`), what one image is (`ImageRequest`), and
which device and dtype the engine runs at. Light: no diffusers import."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import PIL.Image

from schemas.constants import (
    DEFAULT_SIZE,
    DPM_GUIDANCE,
    DPM_STEPS,
    LCM_GUIDANCE,
    LCM_STEPS,
    SCHEDULERS,
    check_image_side,
)
from schemas.errors import SpecError

if TYPE_CHECKING:  # the spec is only read here: generation imports no pydantic
    from schemas.job import GenerationSpec

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
