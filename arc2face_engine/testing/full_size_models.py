"""Stable Diffusion 1.5-sized random models in Arc2Face's published layout, for benchmarks:
the same layer shapes and FLOPs as the real weights (no real weights can reach a bench
machine). The face models come from `full_size_faces` (or stay tiny)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel

from arc2face_engine.testing import tiny_models
from arc2face_engine.testing.tiny_faces import write_tiny_antelopev2


def write_full_size_models(root: Path, device: torch.device) -> Path:
    """Stable Diffusion 1.5-sized random models in the published layout (fp16 files)."""
    vocab_size = tiny_models.write_tiny_tokenizer(root / "tokenizer")
    with torch.device(device):  # random init of 1B parameters is much faster on a GPU
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # SD 1.5 config
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            latent_channels=4,
            sample_size=512,
            scaling_factor=0.18215,
        )
        encoder_config = CLIPTextConfig(  # CLIP ViT-L/14's text tower
            vocab_size=max(vocab_size, 49408),
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=0,
            pad_token_id=1,
            eos_token_id=2,
        )
        encoder = CLIPTextModel(encoder_config)
    unet.half().save_pretrained(root / "arc2face")
    vae.half().save_pretrained(root / "vae")
    _save_transformers4_encoder(encoder.half(), root / "encoder")
    _write_common(root, unet)
    return root


def _save_transformers4_encoder(encoder: CLIPTextModel, folder: Path) -> None:
    """Arc2Face's encoder/ format: config.json + a pickled state dict under `text_model.`."""
    encoder.config.save_pretrained(folder)
    state_dict = {
        f"text_model.{key}": tensor.contiguous().cpu()
        for key, tensor in encoder.state_dict().items()
        if not key.endswith("position_ids")
    }
    torch.save(state_dict, folder / "pytorch_model.bin")


def _write_common(root: Path, unet: UNet2DConditionModel) -> None:
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(
        json.dumps(tiny_models.SD15_SCHEDULER_CONFIG)
    )
    (root / "lcm-lora").mkdir(parents=True, exist_ok=True)
    lora = {key: value.cpu() for key, value in tiny_models.build_tiny_lcm_lora(unet.float()).items()}
    save_file(lora, root / "lcm-lora" / "pytorch_lora_weights.safetensors")
    write_tiny_antelopev2(root / "antelopev2")


