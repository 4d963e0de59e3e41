"""A complete models directory with tiny random weights, in the published layout.

No weights can be downloaded where the tests run, so every loader is exercised on these
instead: same folders, same file names, same file formats (safetensors from
`save_pretrained`, a transformers-4.36-style `pytorch_model.bin`, a kohya-style LoRA, an
IP-Adapter `.bin`), only a few thousand parameters. Images are 64x64: the VAE keeps SD
1.5's down-sampling factor of 8 and the UNet works on 8x8 latents.

Deterministic: the same call writes the same bytes (each model is built after its own
`torch.manual_seed`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from arc2face_engine.generation import adapter_layouts as layouts
from arc2face_engine.models_dir import write_checksums
from schemas.constants import EXPRESSION_DIM  # FLAME: 50 expression + 2 eyelid + 3 jaw

TINY_IMAGE_SIZE = 64
TINY_LATENT_SIZE = 8
# Wider than ArcFace's 512 so that the zero-padding of the identity embedding is exercised.
TINY_ENCODER_WIDTH = 576
IP_ADAPTER_TOKENS = 4  # diffusers' plain IP-Adapter ImageProjection always makes 4 tokens
LORA_RANK = 4
LORA_ALPHA = 2.0
PROMPT_WORDS = ("photo", "of", "a", "id", "person")

START_TOKEN = "<|startoftext|>"
END_TOKEN = "<|endoftext|>"


def _seed(offset: int) -> torch.Generator:
    """Seed the global RNG (diffusers/transformers initialise layers from it) and return a
    generator for our own random tensors."""
    torch.manual_seed(offset)
    return torch.Generator().manual_seed(1000 + offset)


def _write_json(path: Path, content: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(content, indent=2, sort_keys=True) + "\n")


# --- tokenizer ----------------------------------------------------------------------------


def _byte_characters() -> list[str]:
    """CLIP's (GPT-2's) reversible byte -> unicode table, in byte order: printable Latin-1
    bytes stand for themselves, the others are shifted above 255."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    characters, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            characters[byte] = chr(byte)
        else:
            characters[byte] = chr(256 + shifted)
            shifted += 1
    return [characters[byte] for byte in range(256)]


def _word_merges(word: str) -> list[tuple[str, str]]:
    """Left-to-right merges that turn `word` into the single token `word</w>`.

    CLIP's BPE starts from characters with `</w>` glued to the last one; merging the
    growing prefix with the next character leaves exactly one applicable merge at each
    step, so the order of the words' merges does not matter."""
    pieces = [*word[:-1], word[-1] + "</w>"]
    merges, prefix = [], pieces[0]
    for piece in pieces[1:]:
        merges.append((prefix, piece))
        prefix += piece
    return merges


def write_tiny_tokenizer(folder: Path) -> int:
    """Write a CLIPTokenizer file set whose vocabulary has every byte (alone and as a word
    end) and the prompt's words as single tokens. Returns the vocabulary size."""
    characters = _byte_characters()
    merges = [merge for word in PROMPT_WORDS for merge in _word_merges(word)]
    tokens = [*characters, *(c + "</w>" for c in characters)]
    tokens += ["".join(pair) for pair in merges]
    tokens += [START_TOKEN, END_TOKEN]
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    merges_text = "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges)
    (folder / "merges.txt").write_text(merges_text)
    special = {
        "bos_token": START_TOKEN,
        "eos_token": END_TOKEN,
        "pad_token": END_TOKEN,
        "unk_token": END_TOKEN,
    }
    _write_json(folder / "special_tokens_map.json", special)
    _write_json(
        folder / "tokenizer_config.json",
        {
            **special,
            "add_prefix_space": False,
            "do_lower_case": True,
            "errors": "replace",
            "model_max_length": 77,
            "tokenizer_class": "CLIPTokenizer",
        },
    )
    return len(vocab)


# --- text encoder -------------------------------------------------------------------------


def _encoder_config(vocab_size: int) -> dict:
    """A config.json shaped like the one transformers 4.36 saved for Arc2Face's encoder
    (CLIP ViT-L/14's text tower), shrunk."""
    return {
        "_name_or_path": "tiny-arc2face-encoder",
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": TINY_ENCODER_WIDTH,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "projection_dim": 32,
        "torch_dtype": "float32",
        "transformers_version": "4.36.0",
        "vocab_size": vocab_size,
    }


def _config_fields(config: dict) -> dict:
    return {
        key: value for key, value in config.items() if key not in ("architectures", "_name_or_path")
    }


def write_tiny_encoder(folder: Path, vocab_size: int) -> None:
    """CLIPTextModel weights as transformers 4 saved them: a pickled state dict whose keys
    sit under `text_model.` (transformers 5's CLIPTextModel has no such level)."""
    config = _encoder_config(vocab_size)
    _seed(1)
    model = CLIPTextModel(CLIPTextConfig(**_config_fields(config)))
    state_dict = {
        f"text_model.{key}": tensor.contiguous()
        for key, tensor in model.state_dict().items()
        if not key.endswith("position_ids")  # a non-persistent buffer since transformers 4.31
    }
    folder.mkdir(parents=True, exist_ok=True)
    _write_json(folder / "config.json", config)
    torch.save(state_dict, folder / "pytorch_model.bin")


# --- UNet, ControlNet, VAE, scheduler -----------------------------------------------------


def build_tiny_unet() -> UNet2DConditionModel:
    """SD 1.5's block types, two resolutions instead of four."""
    _seed(2)
    return UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(32, 64),
        layers_per_block=1,
        attention_head_dim=4,
        norm_num_groups=8,
        cross_attention_dim=TINY_ENCODER_WIDTH,
    )


def build_tiny_controlnet(unet: UNet2DConditionModel) -> ControlNetModel:
    """ControlNet copied from the UNet, its zero convolutions given random weights so that
    it changes the output (a freshly made ControlNet is a no-op by design)."""
    generator = _seed(3)
    # Four stages: the conditioning image is down-sampled 8x, like SD 1.5's ControlNets.
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    zero_initialised = (
        "controlnet_down_blocks",
        "controlnet_mid_block",
        "controlnet_cond_embedding.conv_out",
    )
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(zero_initialised):
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    return controlnet


def build_tiny_vae() -> AutoencoderKL:
    _seed(4)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=TINY_IMAGE_SIZE,
        scaling_factor=0.18215,
    )


# Stable Diffusion 1.5's scheduler/scheduler_config.json.
SD15_SCHEDULER_CONFIG = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


# --- expression adapter ---------------------------------------------------------------------


def _cross_attention_layers(unet: UNet2DConditionModel) -> list[tuple[str, int]]:
    """(processor name, hidden size) of each cross-attention layer, in the order diffusers'
    IP-Adapter loader walks `unet.attn_processors`."""
    layers = []
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        module = unet.get_submodule(name.removesuffix(".processor"))
        layers.append((name, module.to_k.out_features))
    return layers


def build_tiny_expression_adapter(
    unet: UNet2DConditionModel, layout: str = layouts.IMAGE_PROJECTION
) -> dict[str, dict[str, torch.Tensor]]:
    """An IP-Adapter checkpoint whose "image embedding" is a FLAME vector (55 values): an
    image projection in one of the layouts diffusers loads (adapter_layouts; default the
    plain ImageProjection, proj + norm -> 4 tokens), with the original IP-Adapter key
    names, plus one to_k_ip/to_v_ip pair per cross-attention layer. IP-Adapter numbers all
    attention layers from 1, self- and cross-, and only the cross ones carry weights: 1, 3, 5..."""
    generator = _seed(5)
    cross_dim = unet.config.cross_attention_dim

    def random(*shape: int) -> torch.Tensor:
        return 0.05 * torch.randn(shape, generator=generator)

    image_proj = _TINY_PROJECTIONS[layout](random, cross_dim)
    ip_adapter = {}
    for index, (_, hidden_size) in enumerate(_cross_attention_layers(unet)):
        layer_id = 2 * index + 1
        ip_adapter[f"{layer_id}.to_k_ip.weight"] = random(hidden_size, cross_dim)
        ip_adapter[f"{layer_id}.to_v_ip.weight"] = random(hidden_size, cross_dim)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _norm(random, prefix: str, size: int) -> dict[str, torch.Tensor]:
    return {f"{prefix}.weight": 1.0 + random(size), f"{prefix}.bias": random(size)}


def _linear(random, prefix: str, out: int, into: int, bias: bool = True) -> dict:
    weights = {f"{prefix}.weight": random(out, into)}
    return weights | ({f"{prefix}.bias": random(out)} if bias else {})


def _tiny_image_projection(random, cross_dim: int) -> dict[str, torch.Tensor]:
    """ImageProjection: linear to 4 tokens, LayerNorm."""
    proj = _linear(random, "proj", IP_ADAPTER_TOKENS * cross_dim, EXPRESSION_DIM)
    return proj | _norm(random, "norm", cross_dim)


def _tiny_mlp(random, cross_dim: int) -> dict[str, torch.Tensor]:
    """IP-Adapter Full's MLPProjModel: Linear(55, 55), GELU, Linear(55, cross), LayerNorm."""
    return (
        _linear(random, "proj.0", EXPRESSION_DIM, EXPRESSION_DIM)
        | _linear(random, "proj.2", cross_dim, EXPRESSION_DIM)
        | _norm(random, "proj.3", cross_dim)
    )


def _tiny_mlp_tokens(random, cross_dim: int) -> dict[str, torch.Tensor]:
    """IP-Adapter FaceID's MLPProjModel: Linear(55, 2 * 55), GELU, Linear to 3 tokens, LayerNorm."""
    hidden, tokens = 2 * EXPRESSION_DIM, 3
    return (
        _linear(random, "proj.0", hidden, EXPRESSION_DIM)
        | _linear(random, "proj.2", tokens * cross_dim, hidden)
        | _norm(random, "norm", cross_dim)
    )


def _tiny_resampler(random, cross_dim: int) -> dict[str, torch.Tensor]:
    """IP-Adapter Plus's Resampler: 4 learned queries, 4 blocks (diffusers builds 4) of
    one 64-wide attention head (diffusers reads heads as to_q rows / 64) and a 4x MLP."""
    width, queries = 64, 4
    weights = {"latents": random(1, queries, width)}
    weights |= _linear(random, "proj_in", width, EXPRESSION_DIM)
    weights |= _linear(random, "proj_out", cross_dim, width) | _norm(random, "norm_out", cross_dim)
    for block in range(4):
        attention, feed_forward = f"layers.{block}.0", f"layers.{block}.1"
        weights |= _norm(random, f"{attention}.norm1", width)
        weights |= _norm(random, f"{attention}.norm2", width)
        weights |= _linear(random, f"{attention}.to_q", width, width, bias=False)
        weights |= _linear(random, f"{attention}.to_kv", 2 * width, width, bias=False)
        weights |= _linear(random, f"{attention}.to_out", width, width, bias=False)
        weights |= _norm(random, f"{feed_forward}.0", width)
        weights |= _linear(random, f"{feed_forward}.1", 4 * width, width, bias=False)
        weights |= _linear(random, f"{feed_forward}.3", width, 4 * width, bias=False)
    return weights


_TINY_PROJECTIONS = {
    layouts.IMAGE_PROJECTION: _tiny_image_projection,
    layouts.MLP: _tiny_mlp,
    layouts.MLP_TOKENS: _tiny_mlp_tokens,
    layouts.RESAMPLER: _tiny_resampler,
}


# --- LCM-LoRA ---------------------------------------------------------------------------------

# Modules latent-consistency/lcm-lora-sdv1-5 adapts: attention projections, the
# transformer's in/out projections and feed-forward, and the ResNet / resampler convs.
_LORA_TARGET_SUFFIXES = (
    ".to_q",
    ".to_k",
    ".to_v",
    ".to_out.0",
    ".proj_in",
    ".proj_out",
    ".ff.net.0.proj",
    ".ff.net.2",
    ".conv1",
    ".conv2",
    ".conv_shortcut",
    ".time_emb_proj",
    ".downsamplers.0.conv",
    ".upsamplers.0.conv",
)


def build_tiny_lcm_lora(unet: UNet2DConditionModel) -> dict[str, torch.Tensor]:
    """A LoRA in the published file's (kohya) key format:
    `lora_unet_<module path with dots as underscores>.{lora_down.weight, lora_up.weight, alpha}`,
    half precision, with random up *and* down weights so it changes the output."""
    generator = _seed(6)
    state_dict = {}
    for name, module in unet.named_modules():
        if not name.endswith(_LORA_TARGET_SUFFIXES):
            continue
        if not isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            continue
        prefix = "lora_unet_" + name.replace(".", "_")
        if isinstance(module, torch.nn.Linear):
            down_shape = (LORA_RANK, module.in_features)
            up_shape = (module.out_features, LORA_RANK)
        else:
            down_shape = (LORA_RANK, module.in_channels, *module.kernel_size)
            up_shape = (module.out_channels, LORA_RANK, 1, 1)
        state_dict[f"{prefix}.lora_down.weight"] = 0.1 * torch.randn(
            down_shape, generator=generator
        )
        state_dict[f"{prefix}.lora_up.weight"] = 0.1 * torch.randn(up_shape, generator=generator)
        state_dict[f"{prefix}.alpha"] = torch.tensor(LORA_ALPHA)
    return {key: tensor.half() for key, tensor in state_dict.items()}


# --- the whole directory ----------------------------------------------------------------------


def write_tiny_models(root: str | os.PathLike, include_face_models: bool = True) -> Path:
    """Write a complete models directory with tiny random weights into `root`; with
    `include_face_models`, also the tiny antelopev2 ONNX models. Returns `root`."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)

    vocab_size = write_tiny_tokenizer(root / "tokenizer")
    write_tiny_encoder(root / "encoder", vocab_size)

    unet = build_tiny_unet()
    unet.save_pretrained(root / "arc2face")
    build_tiny_controlnet(unet).save_pretrained(root / "controlnet")
    build_tiny_vae().save_pretrained(root / "vae")
    _write_json(root / "scheduler" / "scheduler_config.json", SD15_SCHEDULER_CONFIG)

    (root / "exp_adapter").mkdir(parents=True, exist_ok=True)
    torch.save(build_tiny_expression_adapter(unet), root / "exp_adapter" / "exp_adapter.bin")
    (root / "lcm-lora").mkdir(parents=True, exist_ok=True)
    save_file(build_tiny_lcm_lora(unet), root / "lcm-lora" / "pytorch_lora_weights.safetensors")

    if include_face_models:
        # Written by its own module; imported here so the diffusion side works without it.
        from arc2face_engine.testing.tiny_faces import write_tiny_antelopev2

        write_tiny_antelopev2(root / "antelopev2")

    write_checksums(root)
    return root
