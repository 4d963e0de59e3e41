"""Identity conditioning, seeding and the batched generation engine, on tiny models (CPU).

The references are built independently of the engine: Arc2Face's conditioning re-derived
from its description (token embedding of "id" replaced, then the CLIP encoder), plain
diffusers pipelines assembled from the tiny models directory with Arc2Face's recipe.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DPMSolverMultistepScheduler,
    LCMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPTextModel, CLIPTokenizer

from arc2face_engine.determinism import CPU_THREADS, image_seed
from arc2face_engine.generation import engine as generation_engine
from arc2face_engine.generation.conditioning import IdentityConditioner
from arc2face_engine.generation.devices import resolve_device, resolve_dtype
from arc2face_engine.generation.engine import Arc2FaceEngine
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from arc2face_engine.testing.tiny_models import TINY_IMAGE_SIZE, write_tiny_models
from schemas.errors import CheckpointMismatch, SpecError, UserError

SIZE = TINY_IMAGE_SIZE
BASE = GenerationSettings(num_inference_steps=3, height=SIZE, width=SIZE)
LCM = GenerationSettings.lcm(steps=2, height=SIZE, width=SIZE)


@pytest.fixture(scope="module", autouse=True)
def same_threads_as_the_engine():
    """The plain diffusers references run with the engine's CPU thread count: torch's
    elementwise kernels give last-bit differences across thread counts."""
    previous = torch.get_num_threads()
    torch.set_num_threads(CPU_THREADS)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Only the diffusion side: these tests never run face analysis.
    return write_tiny_models(tmp_path_factory.mktemp("models"), include_face_models=False)


@pytest.fixture(scope="module")
def engine(models_dir: Path) -> Arc2FaceEngine:
    return Arc2FaceEngine.from_pretrained(
        models_dir, device="cpu", controlnet=True, expression=True, lcm=True
    )


def _embeddings(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 512)).astype(np.float32)


def _pose(seed: int, size: int = SIZE) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)


def _expression(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, 55).astype(np.float32)


# --- seeding ---------------------------------------------------------------------------------


def test_image_seed_is_stable_and_distinct():
    # Pinned values: changing image_seed would silently change every dataset's images.
    assert image_seed(0, 0, 0, 0) == 1270721954577156950
    assert image_seed(1, 2, 3, 4) == 4733761778005789610
    seeds = {image_seed(5, i, v, a) for i in range(20) for v in range(10) for a in range(3)}
    assert len(seeds) == 600
    assert all(0 <= seed < 2**63 for seed in seeds)
    assert image_seed(1, 2, 3, 4) != image_seed(1, 2, 4, 3)
    with pytest.raises(ValueError):
        image_seed(2**63, 0, 0, 0)


# --- conditioning ------------------------------------------------------------------------------


def _arc2face_project_face_embs(
    text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, embeddings: torch.Tensor
) -> torch.Tensor:
    """Arc2Face's projection re-derived by hand, every layer unrolled: tokenize the
    prompt, look the tokens up, write the normalised, zero-padded ArcFace vector at the
    "id" token, add positions, run pre-LN causal self-attention blocks with quick-GELU
    MLPs, final layer norm."""
    config = text_encoder.config
    ids = tokenizer(
        "photo of a id person", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    id_token = tokenizer.convert_tokens_to_ids("id</w>")
    embeddings = embeddings / embeddings.norm(dim=1, keepdim=True)
    padded = F.pad(embeddings, (0, config.hidden_size - 512))
    tokens = text_encoder.embeddings.token_embedding.weight[ids[0]].expand(len(embeddings), -1, -1)
    tokens = torch.where((ids[0] == id_token)[None, :, None], padded[:, None, :], tokens)
    hidden = tokens + text_encoder.embeddings.position_embedding.weight[:77]

    heads, width = config.num_attention_heads, config.hidden_size
    head_dim = width // heads
    blocked = torch.triu(torch.full((77, 77), float("-inf")), diagonal=1)

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(len(x), 77, heads, head_dim).transpose(1, 2)

    for layer in text_encoder.encoder.layers:
        attention = layer.self_attn
        x = F.layer_norm(hidden, (width,), layer.layer_norm1.weight, layer.layer_norm1.bias, 1e-5)
        q, k, v = (
            split(proj(x)) for proj in (attention.q_proj, attention.k_proj, attention.v_proj)
        )
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(head_dim) + blocked, dim=-1)
        mixed = (weights @ v).transpose(1, 2).reshape(len(x), 77, width)
        hidden = hidden + attention.out_proj(mixed)
        x = F.layer_norm(hidden, (width,), layer.layer_norm2.weight, layer.layer_norm2.bias, 1e-5)
        x = layer.mlp.fc1(x)
        hidden = hidden + layer.mlp.fc2(x * torch.sigmoid(1.702 * x))
    final = text_encoder.final_layer_norm
    return F.layer_norm(hidden, (width,), final.weight, final.bias, 1e-5)


def _forward_with_id_token(
    text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer, embeddings: torch.Tensor
) -> torch.Tensor:
    """The same projection through transformers' own CLIPTextModel.forward: a hook swaps
    the "id" token's embedding on its way out of the token-embedding table."""
    ids = tokenizer(
        "photo of a id person", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids.expand(len(embeddings), -1)
    id_mask = ids == tokenizer.convert_tokens_to_ids("id</w>")
    padded = F.pad(F.normalize(embeddings, dim=1), (0, text_encoder.config.hidden_size - 512))

    def replace_id_token(module, inputs, output):
        return torch.where(id_mask[..., None], padded[:, None, :], output)

    hook = text_encoder.embeddings.token_embedding.register_forward_hook(replace_id_token)
    try:
        with torch.no_grad():
            return text_encoder(ids).last_hidden_state
    finally:
        hook.remove()


@pytest.fixture(scope="module")
def text_parts(models_dir: Path) -> tuple[CLIPTextModel, CLIPTokenizer]:
    # Loaded the way any transformers user would, not through the engine's loaders.
    text_encoder = CLIPTextModel.from_pretrained(models_dir / "encoder").eval()
    return text_encoder, CLIPTokenizer.from_pretrained(models_dir / "tokenizer")


def test_conditioning_matches_arc2face_projection(text_parts):
    text_encoder, tokenizer = text_parts
    embeddings = torch.from_numpy(_embeddings(3)) * 7.0  # not normalised on purpose
    prompt_embeds = IdentityConditioner(text_encoder, tokenizer).encode(embeddings)

    assert prompt_embeds.shape == (3, 77, text_encoder.config.hidden_size)
    assert torch.equal(prompt_embeds, _forward_with_id_token(text_encoder, tokenizer, embeddings))
    with torch.no_grad():
        by_hand = _arc2face_project_face_embs(text_encoder, tokenizer, embeddings)
    torch.testing.assert_close(prompt_embeds, by_hand, rtol=1e-5, atol=1e-5)
    # The identity actually conditions the output, also at the positions after "id".
    other = IdentityConditioner(text_encoder, tokenizer).encode(embeddings.roll(1, dims=0))
    assert not torch.allclose(prompt_embeds[:, 5:], other[:, 5:])
    assert torch.allclose(prompt_embeds[:, :4], other[:, :4])  # causal: before "id" unchanged


def test_unconditional_is_the_pipelines_negative_prompt(text_parts, models_dir):
    text_encoder, tokenizer = text_parts
    conditioner = IdentityConditioner(text_encoder, tokenizer)
    pipeline = _plain_pipeline(models_dir)
    prompt_embeds = conditioner.encode(torch.from_numpy(_embeddings(1)))
    _, negative = pipeline.encode_prompt(
        None, "cpu", 1, do_classifier_free_guidance=True, prompt_embeds=prompt_embeds
    )
    assert torch.equal(conditioner.unconditional(), negative)
    assert conditioner.unconditional() is conditioner.unconditional()


def test_conditioning_rejects_bad_embeddings(text_parts):
    conditioner = IdentityConditioner(*text_parts)
    with pytest.raises(UserError, match="zero or not finite"):
        conditioner.encode(torch.zeros(1, 512))
    with pytest.raises(ValueError, match=r"\(B, 512\)"):
        conditioner.encode(torch.ones(2, 128))


# --- plain diffusers references ---------------------------------------------------------------


def _plain_pipeline(models_dir: Path, scheduler_class=DPMSolverMultistepScheduler):
    """Arc2Face's usage: SD 1.5 parts, Arc2Face's UNet and encoder, no safety checker, the
    SD 1.5 scheduler config turned into a DPM-Solver++ (or LCM) scheduler."""
    pipeline = StableDiffusionPipeline(
        vae=AutoencoderKL.from_pretrained(models_dir / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(models_dir / "encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(models_dir / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(models_dir / "arc2face"),
        scheduler=scheduler_class.from_pretrained(models_dir / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _projected(pipeline, embedding: np.ndarray) -> torch.Tensor:
    return _forward_with_id_token(
        pipeline.text_encoder, pipeline.tokenizer, torch.from_numpy(embedding[None])
    )


def test_engine_equals_plain_diffusers_pipeline(engine, models_dir):
    embedding, seed = _embeddings(1, seed=3)[0], 1234
    pipeline = _plain_pipeline(models_dir)
    expected = pipeline(
        prompt_embeds=_projected(pipeline, embedding),
        generator=torch.Generator().manual_seed(seed),
        num_inference_steps=BASE.num_inference_steps,
        guidance_scale=BASE.guidance_scale,
        height=SIZE,
        width=SIZE,
    ).images[0]
    image = engine.generate([ImageRequest(embedding, seed)], BASE)
    assert image.shape == (1, SIZE, SIZE, 3) and image.dtype == np.uint8
    assert np.array_equal(image[0], np.array(expected))


def test_controls_equal_plain_diffusers_pipelines(engine, models_dir):
    """Pose: the ControlNet pipeline given a PIL normal map; expression: the IP-Adapter
    loaded by diffusers itself, uncond half zeros; LCM: the LoRA loaded and fused by
    diffusers. Each equals the engine bit-for-bit."""
    embedding, seed, pose, expression = _embeddings(1, seed=4)[0], 99, _pose(1), _expression(1)
    common = {"num_inference_steps": 3, "height": SIZE, "width": SIZE}

    pipeline = _plain_pipeline(models_dir)
    controlnet = StableDiffusionControlNetPipeline(
        **pipeline.components, controlnet=ControlNetModel.from_pretrained(models_dir / "controlnet")
    )
    controlnet.set_progress_bar_config(disable=True)
    expected_pose = controlnet(
        prompt_embeds=_projected(pipeline, embedding),
        image=Image.fromarray(pose),
        generator=torch.Generator().manual_seed(seed),
        guidance_scale=3.0,
        **common,
    ).images[0]
    image = engine.generate([ImageRequest(embedding, seed, pose_image=pose)], BASE)[0]
    assert np.array_equal(image, np.array(expected_pose))

    pipeline.load_ip_adapter(
        str(models_dir),
        subfolder="exp_adapter",
        weight_name="exp_adapter.bin",
        image_encoder_folder=None,
    )
    values = torch.from_numpy(expression)[None, None]
    expected_expression = pipeline(
        prompt_embeds=_projected(pipeline, embedding),
        ip_adapter_image_embeds=[torch.cat([torch.zeros_like(values), values])],
        generator=torch.Generator().manual_seed(seed),
        guidance_scale=3.0,
        **common,
    ).images[0]
    image = engine.generate([ImageRequest(embedding, seed, expression=expression)], BASE)[0]
    assert np.array_equal(image, np.array(expected_expression))

    lcm = _plain_pipeline(models_dir, LCMScheduler)
    lcm.load_lora_weights(models_dir / "lcm-lora", weight_name="pytorch_lora_weights.safetensors")
    lcm.fuse_lora()
    expected_lcm = lcm(
        prompt_embeds=_projected(lcm, embedding),
        generator=torch.Generator().manual_seed(seed),
        guidance_scale=1.0,
        **{**common, "num_inference_steps": LCM.num_inference_steps},
    ).images[0]
    image = engine.generate([ImageRequest(embedding, seed)], LCM)[0]
    assert np.array_equal(image, np.array(expected_lcm))


# --- batch-composition invariance -------------------------------------------------------------


def _assert_batch_invariant(engine, requests, settings, positions):
    batch = engine.generate(requests, settings)
    for position in positions:
        alone = engine.generate([requests[position]], settings)[0]
        assert np.array_equal(batch[position], alone), f"request {position} depends on its batch"
    return batch


def test_batch_composition_invariance(engine):
    embeddings = _embeddings(4, seed=5)
    requests = [ImageRequest(embeddings[i], seed=image_seed(0, i, 0, 0)) for i in range(4)]
    # The same request at another position, next to other identities.
    shuffled = [requests[2], requests[0], requests[3], requests[1]]
    batch = _assert_batch_invariant(engine, requests, BASE, positions=[0, 2])
    assert np.array_equal(engine.generate(shuffled, BASE)[0], batch[2])
    assert len({image.tobytes() for image in batch}) == 4


def test_lcm_path(engine, models_dir):
    assert LCM.guidance_scale == 1.0 and not LCM.uses_guidance
    embeddings = _embeddings(3, seed=6)
    requests = [ImageRequest(embeddings[i], seed=10 + i) for i in range(3)]
    lcm_images = _assert_batch_invariant(engine, requests, LCM, positions=[1])
    base_images = engine.generate(requests, dataclasses.replace(LCM, scheduler="dpmsolver++"))
    assert not np.array_equal(lcm_images, base_images)
    # The LoRA lives in its own UNet copy: dpmsolver++ calls still get Arc2Face's UNet.
    plain_engine = Arc2FaceEngine.from_pretrained(models_dir, device="cpu")
    assert np.array_equal(
        plain_engine.generate(requests[:1], BASE), engine.generate(requests[:1], BASE)
    )
    with pytest.raises(UserError, match="lcm=True"):
        plain_engine.generate(requests[:1], LCM)
    with pytest.raises(UserError, match="controlnet=True"):
        plain_engine.generate([ImageRequest(embeddings[0], 1, pose_image=_pose(0))], BASE)


def test_controlnet_changes_output(engine):
    embedding = _embeddings(1, seed=8)[0]
    plain, pose_a, pose_b = engine.generate(
        [
            ImageRequest(embedding, 5),
            ImageRequest(embedding, 5, pose_image=_pose(2)),
            ImageRequest(embedding, 5, pose_image=_pose(3)),
        ],
        BASE,
    )
    assert not np.array_equal(plain, pose_a)
    assert not np.array_equal(pose_a, pose_b)
    # A pose image of another size is resized to the output size.
    resized = engine.generate([ImageRequest(embedding, 5, pose_image=_pose(2, size=96))], BASE)
    assert resized.shape == (1, SIZE, SIZE, 3)


def test_expression_adapter_changes_output_and_gets_zero_uncond(engine):
    embedding = _embeddings(1, seed=9)[0]
    expressions = [_expression(4), _expression(5)]
    seen: list[torch.Tensor] = []
    projection = engine.variants["dpmsolver++"].expression.projection
    hook = projection.register_forward_pre_hook(lambda module, args: seen.append(args[0][0]))
    try:
        plain, first, second = engine.generate(
            [
                ImageRequest(embedding, 6),
                ImageRequest(embedding, 6, expression=expressions[0]),
                ImageRequest(embedding, 6, expression=expressions[1]),
            ],
            BASE,
        )
    finally:
        hook.remove()
    assert not np.array_equal(plain, first)
    assert not np.array_equal(first, second)
    # What reached the UNet: (2, 1, 55) per image, uncond (first) half zeros.
    assert len(seen) == 2 * BASE.num_inference_steps
    for embeds, expression in zip(seen[:: BASE.num_inference_steps], expressions, strict=True):
        assert embeds.shape == (2, 1, 55)
        assert torch.equal(embeds[0], torch.zeros(1, 55))
        assert torch.equal(embeds[1, 0], torch.from_numpy(expression))
    # Without guidance (LCM, its own UNet copy and adapter) only the conditional half.
    seen.clear()
    lcm_projection = engine.variants["lcm"].expression.projection
    hook = lcm_projection.register_forward_pre_hook(lambda module, args: seen.append(args[0][0]))
    try:
        engine.generate([ImageRequest(embedding, 6, expression=expressions[0])], LCM)
    finally:
        hook.remove()
    assert seen[0].shape == (1, 1, 55)
    assert torch.equal(seen[0][0, 0], torch.from_numpy(expressions[0]))


def test_mixed_controls_keep_invariance(engine):
    embeddings = _embeddings(5, seed=11)
    requests = [
        ImageRequest(embeddings[0], 21, pose_image=_pose(5), expression=_expression(6)),
        ImageRequest(embeddings[1], 22),
        ImageRequest(embeddings[2], 23, expression=_expression(7)),
        ImageRequest(embeddings[3], 24, pose_image=_pose(8)),
        ImageRequest(embeddings[4], 25, pose_image=_pose(9), expression=_expression(10)),
    ]
    _assert_batch_invariant(engine, requests, BASE, positions=range(5))


def test_full_batches_keep_request_order(engine, monkeypatch):
    """The GPU path (whole groups in one forward) on CPU: same images up to CPU kernels'
    batch-size rounding, each in its request's place."""
    monkeypatch.setattr(generation_engine, "_CPU_MICRO_BATCH", None)
    embeddings = _embeddings(4, seed=13)
    requests = [
        ImageRequest(embeddings[0], 31, pose_image=_pose(11)),
        ImageRequest(embeddings[1], 32, expression=_expression(12)),
        ImageRequest(embeddings[2], 33, pose_image=_pose(13)),
        ImageRequest(embeddings[3], 34, expression=_expression(14)),
    ]
    assert engine._batches(requests) == [[0, 2], [1, 3]]
    seen: list[torch.Tensor] = []
    projection = engine.variants["dpmsolver++"].expression.projection
    hook = projection.register_forward_pre_hook(lambda module, args: seen.append(args[0][0]))
    try:
        batches = {settings: engine.generate(requests, settings) for settings in (BASE, LCM)}
    finally:
        hook.remove()
    # One expression row per image (diffusers would repeat them batch-size times).
    assert seen[0].shape == (4, 1, 55)
    assert torch.equal(
        seen[0][2:, 0], torch.from_numpy(np.stack([_expression(12), _expression(14)]))
    )
    for settings, batch in batches.items():
        for position, request in enumerate(requests):
            alone = engine.generate([request], settings)[0]
            difference = np.abs(batch[position].astype(int) - alone)
            assert difference.max() <= 2 and difference.mean() < 0.1


def test_unconditional_encoded_once(models_dir):
    engine = Arc2FaceEngine.from_pretrained(models_dir, device="cpu")
    calls = []
    text_encoder = engine.conditioner.text_encoder
    hook = text_encoder.register_forward_hook(lambda *args: calls.append(1))
    try:
        requests = [ImageRequest(e, i) for i, e in enumerate(_embeddings(2, seed=12))]
        engine.generate(requests, BASE)
        engine.generate(requests, BASE)
    finally:
        hook.remove()
    # Identity prompts go through the encoder's parts, the empty prompt through its
    # forward: exactly once for two calls of two images, none by the pipeline itself.
    assert len(calls) == 1


# --- bad input and bad checkpoints ------------------------------------------------------------


def test_bad_settings_and_requests(engine):
    with pytest.raises(SpecError, match="scheduler"):
        GenerationSettings(scheduler="ddim")
    with pytest.raises(SpecError, match="multiple of 8"):
        GenerationSettings(height=100)
    with pytest.raises(UserError, match="512 values"):
        engine.generate([ImageRequest(np.ones(128, np.float32), 1)], BASE)
    with pytest.raises(UserError, match="uint8 normal map"):
        engine.generate([ImageRequest(_embeddings(1)[0], 1, pose_image=np.zeros((8, 8)))], BASE)


def test_pose_image_may_be_a_pil_image(engine):
    pose = _pose(2)
    rgba = Image.fromarray(pose).convert("RGBA")
    request = ImageRequest(_embeddings(1, seed=8)[0], 5, pose_image=rgba)
    assert request.pose_image.dtype == np.uint8 and request.pose_image.shape == (SIZE, SIZE, 3)
    np.testing.assert_array_equal(request.pose_image, pose)
    from_pil = engine.generate([request], BASE)
    from_array = engine.generate(
        [ImageRequest(_embeddings(1, seed=8)[0], 5, pose_image=pose)], BASE
    )
    np.testing.assert_array_equal(from_pil, from_array)


def test_pose_image_of_another_type_is_one_line_user_error(engine):
    with pytest.raises(UserError, match="pose image is a list: pass an HxWx3 uint8") as error:
        engine.generate([ImageRequest(_embeddings(1)[0], 1, pose_image=[[0, 0, 0]])], BASE)
    assert "\n" not in str(error.value)


def test_device_and_precision_choices():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", torch.device("cuda")) == torch.float16
    assert resolve_dtype("bf16", cpu) == torch.bfloat16
    with pytest.raises(UserError, match="unknown precision"):
        resolve_dtype("fp8", cpu)
    with pytest.raises(UserError, match="unknown device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        assert resolve_device("auto") == cpu
        with pytest.raises(UserError, match="no CUDA GPU"):
            resolve_device("cuda")


def _copy_models(models_dir: Path, destination: Path) -> Path:
    shutil.copytree(models_dir, destination)
    return destination


def test_mismatched_lcm_lora_is_refused(models_dir, tmp_path):
    copy = _copy_models(models_dir, tmp_path / "models")
    file = copy / "lcm-lora" / "pytorch_lora_weights.safetensors"
    state_dict = load_file(file)
    prefix = "lora_unet_down_blocks_7_attentions_0_proj_in"  # no such block in the UNet
    state_dict[f"{prefix}.lora_down.weight"] = torch.zeros(4, 32, dtype=torch.float16)
    state_dict[f"{prefix}.lora_up.weight"] = torch.zeros(32, 4, dtype=torch.float16)
    state_dict[f"{prefix}.alpha"] = torch.tensor(2.0)
    save_file(state_dict, file)
    with pytest.raises(CheckpointMismatch, match="match no UNet layer"):
        Arc2FaceEngine.from_pretrained(copy, device="cpu", lcm=True)

    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(prefix)}
    text_key = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    state_dict[f"{text_key}.lora_down.weight"] = torch.zeros(4, 576, dtype=torch.float16)
    state_dict[f"{text_key}.lora_up.weight"] = torch.zeros(64, 4, dtype=torch.float16)
    state_dict[f"{text_key}.alpha"] = torch.tensor(2.0)
    save_file(state_dict, file)
    with pytest.raises(CheckpointMismatch, match="not for the UNet"):
        Arc2FaceEngine.from_pretrained(copy, device="cpu", lcm=True)


def test_mismatched_expression_adapter_is_refused(models_dir, tmp_path):
    copy = _copy_models(models_dir, tmp_path / "models")
    file = copy / "exp_adapter" / "exp_adapter.bin"
    original = torch.load(file, weights_only=True)

    def refused(edit, match: str) -> None:
        state_dict = {part: dict(weights) for part, weights in original.items()}
        edit(state_dict)
        torch.save(state_dict, file)
        with pytest.raises(CheckpointMismatch, match=match):
            Arc2FaceEngine.from_pretrained(copy, device="cpu", expression=True)

    refused(
        lambda sd: sd["ip_adapter"].update({"99.to_k_ip.weight": torch.zeros(4, 4)}),
        "match no UNet layer",
    )
    refused(lambda sd: sd["ip_adapter"].pop("1.to_v_ip.weight"), "exp_adapter.bin")
    refused(lambda sd: sd["image_proj"].pop("norm.bias"), "exp_adapter.bin")
    # An adapter for 50-value "image" embeddings, not the 55 FLAME values.
    refused(
        lambda sd: sd["image_proj"].update(
            {"proj.weight": sd["image_proj"]["proj.weight"][:, :50]}
        ),
        "55 FLAME values",
    )
