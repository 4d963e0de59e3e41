"""Expression Adapter checkpoints in every IP-Adapter projection layout diffusers loads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import (
    ImageProjection,
    IPAdapterFaceIDImageProjection,
    IPAdapterFullImageProjection,
    IPAdapterPlusImageProjection,
)

from arc2face_engine.determinism import CPU_THREADS
from arc2face_engine.generation import adapter_layouts as layouts
from arc2face_engine.generation.checkpoints import load_unet
from arc2face_engine.generation.engine import Arc2FaceEngine
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from arc2face_engine.testing import tiny_models
from arc2face_engine.testing.tiny_models import build_tiny_expression_adapter, write_tiny_models
from schemas.errors import CheckpointMismatch
from schemas.tables import EXPRESSION_DIM

SETTINGS = GenerationSettings(num_inference_steps=2, height=64, width=64)
UNGUIDED = GenerationSettings(num_inference_steps=2, height=64, width=64, guidance_scale=1.0)
DIFFUSERS_CLASS = {
    layouts.IMAGE_PROJECTION: ImageProjection,
    layouts.MLP: IPAdapterFullImageProjection,
    layouts.MLP_TOKENS: IPAdapterFaceIDImageProjection,
    layouts.RESAMPLER: IPAdapterPlusImageProjection,
}
TOKENS = {layouts.IMAGE_PROJECTION: 4, layouts.MLP: 1, layouts.MLP_TOKENS: 3, layouts.RESAMPLER: 4}


@pytest.fixture(scope="module", autouse=True)
def same_threads_as_the_engine():
    previous = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_models(tmp_path_factory.mktemp("models"), include_face_models=False)


@pytest.fixture(scope="module")
def adapters(models_dir: Path) -> dict[str, dict]:
    unet = load_unet(models_dir, torch.float32)
    return {layout: build_tiny_expression_adapter(unet, layout) for layout in DIFFUSERS_CLASS}


def with_adapter(models_dir: Path, destination: Path, state_dict: dict) -> Path:
    shutil.copytree(models_dir, destination)
    torch.save(state_dict, destination / "exp_adapter" / "exp_adapter.bin")
    return destination


def expression(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, EXPRESSION_DIM).astype(np.float32)


def test_every_usable_layout_is_one_diffusers_builds():
    assert set(DIFFUSERS_CLASS) == set(layouts.USABLE_LAYOUTS)
    assert set(layouts.LAYOUTS) - set(layouts.USABLE_LAYOUTS) == {layouts.FACEID_PLUS}


@pytest.mark.parametrize("layout", list(DIFFUSERS_CLASS))
def test_layout_loads_strictly_and_generates(layout, models_dir, adapters, tmp_path):
    state_dict = adapters[layout]
    assert layouts.layout_of(state_dict["image_proj"]) == layout
    directory = with_adapter(models_dir, tmp_path / "models", state_dict)
    engine = Arc2FaceEngine.from_pretrained(directory, device="cpu", expression=True)
    projection = engine.variants["dpmsolver++"].expression.projection
    (layer,) = projection.image_projection_layers
    assert type(layer) is DIFFUSERS_CLASS[layout]

    seen = []
    projection.register_forward_hook(lambda module, inputs, output: seen.append(output[0]))
    embedding = np.random.default_rng(1).standard_normal(512).astype(np.float32)
    requests = [
        ImageRequest(embedding, 5, expression=expression(1)),
        ImageRequest(embedding, 5, expression=expression(2)),
        ImageRequest(embedding, 5),
    ]
    first, second, plain = engine.generate(requests, SETTINGS)
    cross_dim = engine.variants["dpmsolver++"].pipeline.unet.config.cross_attention_dim
    assert seen[0].shape[-2:] == (TOKENS[layout], cross_dim)
    assert not np.array_equal(first, second)  # the expression reaches the image
    assert not np.array_equal(first, plain)
    again = engine.generate([requests[0]], SETTINGS)[0]
    assert np.array_equal(first, again)
    assert engine.generate([requests[1]], UNGUIDED)[0].shape == (64, 64, 3)


@pytest.mark.parametrize("layout", list(DIFFUSERS_CLASS))
def test_layout_with_a_stray_key_or_another_input_width_is_refused(
    layout, models_dir, adapters, tmp_path
):
    original = adapters[layout]
    stray = {part: dict(weights) for part, weights in original.items()}
    stray["image_proj"]["extra.weight"] = torch.zeros(4, 4)
    directory = with_adapter(models_dir, tmp_path / "stray", stray)
    with pytest.raises(CheckpointMismatch, match=r"exp_adapter\.bin"):
        Arc2FaceEngine.from_pretrained(directory, device="cpu", expression=True)

    # The same layout built for 50-value "image" embeddings instead of the 55 FLAME values.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tiny_models, "EXPRESSION_DIM", 50)
        narrow = build_tiny_expression_adapter(load_unet(models_dir, torch.float32), layout)
    directory = with_adapter(models_dir, tmp_path / "narrow", narrow)
    with pytest.raises(CheckpointMismatch, match="55 FLAME values"):
        Arc2FaceEngine.from_pretrained(directory, device="cpu", expression=True)


def test_faceid_plus_layout_is_refused_with_the_reason(models_dir, adapters, tmp_path):
    faceid_plus = {part: dict(weights) for part, weights in adapters[layouts.MLP_TOKENS].items()}
    faceid_plus["image_proj"]["perceiver_resampler.proj_in.weight"] = torch.zeros(64, 64)
    directory = with_adapter(models_dir, tmp_path / "models", faceid_plus)
    with pytest.raises(CheckpointMismatch, match="CLIP image features") as error:
        Arc2FaceEngine.from_pretrained(directory, device="cpu", expression=True)
    assert "\n" not in str(error.value)
