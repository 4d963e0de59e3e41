"""Models directory: layout, checksums, download, strict loading, the tiny models writer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel

from arc2face_engine import models_dir
from arc2face_engine.generation import checkpoints
from arc2face_engine.testing.tiny_models import (
    END_TOKEN,
    PROMPT_WORDS,
    TINY_IMAGE_SIZE,
    write_tiny_models,
)
from schemas.errors import CheckpointMismatch, ModelFileMissing, UserError
from schemas.tables import EXPRESSION_DIM

OPTIONAL = ("controlnet", "expression", "lcm")
UNET_WEIGHTS = "arc2face/diffusion_pytorch_model.safetensors"
ENCODER_WEIGHTS = "encoder/pytorch_model.bin"


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny models without the face models, so these tests do not depend on them."""
    return write_tiny_models(tmp_path_factory.mktemp("tiny"), include_face_models=False)


@pytest.fixture
def models(pristine: Path, tmp_path: Path) -> Path:
    """A private copy that a test may damage."""
    return Path(shutil.copytree(pristine, tmp_path / "models"))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


# --- tiny writer and checksums ------------------------------------------------------------


def test_tiny_models_verify_clean_and_are_deterministic(pristine: Path, tmp_path: Path) -> None:
    diffusion_files = [f for f in models_dir.COMPONENT_FILES["core"] if not f.startswith("antelopev2/")]
    for relative in diffusion_files:
        assert (pristine / relative).is_file(), relative
    assert models_dir.verify_models(pristine, OPTIONAL) == []
    again = write_tiny_models(tmp_path / "again", include_face_models=False)
    assert models_dir.read_checksums(again) == models_dir.read_checksums(pristine)


def test_tiny_models_with_face_models_verify_clean(request: pytest.FixtureRequest) -> None:
    pytest.importorskip("arc2face_engine.testing.tiny_faces")
    tiny_models = request.getfixturevalue("tiny_models")  # conftest: include_face_models=True
    assert models_dir.verify_models(tiny_models, ("core", *OPTIONAL)) == []


def test_checksums_cover_every_file(pristine: Path) -> None:
    recorded = models_dir.read_checksums(pristine)
    on_disk = {p.relative_to(pristine).as_posix() for p in pristine.rglob("*") if p.is_file()} - {
        models_dir.CHECKSUMS_FILE
    }
    assert set(recorded) == on_disk
    assert models_dir.file_hashes(pristine) == recorded


def test_changed_byte_fails_verification(models: Path) -> None:
    target = models / UNET_WEIGHTS
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0x01
    target.write_bytes(bytes(data))
    problems = models_dir.verify_models(models, ["core"])
    assert len([p for p in problems if "sha256 mismatch" in p and UNET_WEIGHTS in p]) == 1


def test_missing_and_unrecorded_files_are_problems(models: Path) -> None:
    (models / "controlnet" / "config.json").unlink()
    checksums = models_dir.read_checksums(models)
    del checksums["lcm-lora/pytorch_lora_weights.safetensors"]
    (models / models_dir.CHECKSUMS_FILE).write_text(json.dumps(checksums))
    problems = models_dir.verify_models(models, OPTIONAL)
    assert any("missing controlnet/config.json" in p and "--with controlnet" in p for p in problems)
    assert any("no recorded checksum for lcm-lora/" in p for p in problems)
    assert len(problems) == 2


def test_recorded_files_are_verified_whatever_the_components(models: Path) -> None:
    (models / "controlnet" / "config.json").unlink()
    target = models / "lcm-lora" / "pytorch_lora_weights.safetensors"
    target.write_bytes(target.read_bytes() + b"x")
    problems = models_dir.verify_models(models, [])
    assert len(problems) == 2
    assert any("missing controlnet/config.json" in p and "--with controlnet" in p for p in problems)
    assert any("sha256 mismatch for lcm-lora/" in p and "--with lcm" in p for p in problems)
    # Optional components that were never recorded stay optional.
    checksums = models_dir.read_checksums(models)
    for relative in models_dir.COMPONENT_FILES["controlnet"] + models_dir.COMPONENT_FILES["lcm"]:
        del checksums[relative]
        (models / relative).unlink(missing_ok=True)
    (models / models_dir.CHECKSUMS_FILE).write_text(json.dumps(checksums))
    assert models_dir.verify_models(models, ["expression"]) == []


def test_missing_models_directory_is_one_problem(tmp_path: Path) -> None:
    problems = models_dir.verify_models(tmp_path / "nope", ("core", *OPTIONAL))
    assert len(problems) == 1
    assert "no models directory at" in problems[0]
    assert "models download" in problems[0] and "models tiny" in problems[0]
    assert "\n" not in problems[0]


def test_file_hashes_are_cached(pristine: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = models_dir.file_hashes(pristine)
    calls = []
    monkeypatch.setattr(models_dir, "_sha256", lambda path: calls.append(path) or "x")
    assert models_dir.file_hashes(pristine) == first
    assert calls == []


def test_unknown_component_is_a_user_error(pristine: Path) -> None:
    with pytest.raises(UserError, match="unknown model component 'pose'"):
        models_dir.verify_models(pristine, ["pose"])


# --- download (the Hub and insightface faked: no internet here) -----------------------------


def _fake_hub(requested: list[tuple[str, str]]):
    def hf_hub_download(repo_id: str, filename: str, local_dir: Path, **_: object) -> str:
        requested.append((repo_id, filename))
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(f"{repo_id}/{filename}".encode())
        # The real client keeps bookkeeping here; it must not end up in checksums.json.
        (Path(local_dir) / ".cache" / "huggingface").mkdir(parents=True, exist_ok=True)
        (Path(local_dir) / ".cache" / "huggingface" / "meta").write_text("x")
        return str(target)

    return hf_hub_download


def _fake_insightface_pack(sub_dir: str, name: str, root: str) -> str:
    # The published zip nests the pack one folder deeper and carries glintr100.onnx.
    pack = Path(root) / sub_dir / name
    (pack / name).mkdir(parents=True)
    for file in (*models_dir.ANTELOPEV2_PACK_FILES, "glintr100.onnx"):
        (pack / name / file).write_bytes(file.encode())
    return str(pack)


def test_download_models_fetches_every_file_and_records_checksums(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub
    from insightface.utils import storage

    requested: list[tuple[str, str]] = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", _fake_hub(requested))
    monkeypatch.setattr(storage, "ensure_available", _fake_insightface_pack)
    monkeypatch.setattr(models_dir, "_hub_unreachable", lambda: None)  # the fake Hub is here

    root = models_dir.download_models(tmp_path / "models", with_=["controlnet", "lcm"])

    assert ("FoivosPar/Arc2Face", "encoder/pytorch_model.bin") in requested
    assert ("FoivosPar/Arc2Face", "arcface.onnx") in requested
    assert ("stable-diffusion-v1-5/stable-diffusion-v1-5", "vae/config.json") in requested
    assert ("latent-consistency/lcm-lora-sdv1-5", "pytorch_lora_weights.safetensors") in requested
    assert not any("exp_adapter" in filename for _, filename in requested)
    assert len(requested) == len(set(requested)) == 15  # 12 core, 2 controlnet, 1 lcm
    assert (root / "antelopev2" / "arcface.onnx").read_bytes() == b"FoivosPar/Arc2Face/arcface.onnx"
    assert not (root / "antelopev2" / "glintr100.onnx").exists()
    assert models_dir.verify_models(root, ["core", "controlnet", "lcm"]) == []
    expected = [f for c in ("core", "controlnet", "lcm") for f in models_dir.COMPONENT_FILES[c]]
    assert sorted(models_dir.read_checksums(root)) == sorted(expected)
    assert models_dir.verify_models(root, ["expression"]) != []


def test_download_refuses_what_the_hub_does_not_have(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="not on the Hugging Face Hub") as error:
        models_dir.download_models(tmp_path, with_=["smirk"])
    assert "smirk" in _one_line(error)


# --- require and strict loading ---------------------------------------------------------------


def test_loaders_load_the_published_layout(pristine: Path) -> None:
    unet = checkpoints.load_unet(pristine, torch.float32)
    encoder = checkpoints.load_text_encoder(pristine, torch.float32)
    assert isinstance(unet, UNet2DConditionModel)
    assert isinstance(checkpoints.load_vae(pristine, torch.float32), AutoencoderKL)
    assert isinstance(checkpoints.load_controlnet(pristine, torch.float32), ControlNetModel)
    assert isinstance(encoder, CLIPTextModel)
    # Wider than ArcFace's 512 so that conditioning's zero-padding is exercised.
    assert encoder.config.hidden_size > 512
    assert unet.config.cross_attention_dim == encoder.config.hidden_size
    assert checkpoints.load_scheduler_config(pristine)["beta_schedule"] == "scaled_linear"
    assert checkpoints.load_unet(pristine, torch.float16).dtype == torch.float16


def test_text_encoder_matches_a_model_built_from_its_state_dict(pristine: Path) -> None:
    loaded = checkpoints.load_text_encoder(pristine, torch.float32)
    state_dict = torch.load(pristine / ENCODER_WEIGHTS, weights_only=True)
    assert all(key.startswith("text_model.") for key in state_dict)
    reference = CLIPTextModel(CLIPTextConfig.from_pretrained(pristine / "encoder")).eval()
    reference.load_state_dict({k.removeprefix("text_model."): v for k, v in state_dict.items()})
    input_ids = torch.randint(
        0, loaded.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = reference(input_ids).last_hidden_state
        actual = loaded(input_ids).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)


def test_tokenizer_knows_the_prompt_and_any_text(pristine: Path) -> None:
    tokenizer = checkpoints.load_tokenizer(pristine)
    ids = tokenizer("photo of a id person", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 == tokenizer.model_max_length
    assert tokenizer.convert_ids_to_tokens(ids[1:6]) == [f"{w}</w>" for w in PROMPT_WORDS]
    odd = tokenizer("Grüße, 世界! ☃ 42").input_ids
    assert tokenizer.convert_tokens_to_ids(END_TOKEN) not in odd[1:-1]


def test_missing_file_names_the_file_and_the_command(models: Path) -> None:
    (models / "controlnet" / "config.json").unlink()
    with pytest.raises(ModelFileMissing) as error:
        checkpoints.load_controlnet(models, torch.float32)
    message = _one_line(error)
    assert str(models / "controlnet" / "config.json") in message
    assert f"arc2face-synth models download {models} --with controlnet" in message
    (models / ENCODER_WEIGHTS).unlink()
    with pytest.raises(ModelFileMissing, match=r"encoder/pytorch_model\.bin"):
        checkpoints.load_text_encoder(models, torch.float32)


def _edit_unet(models: Path, edit) -> None:
    path = models / UNET_WEIGHTS
    state_dict = load_file(path)
    edit(state_dict)
    save_file(state_dict, path, metadata={"format": "pt"})


def _edit_encoder(models: Path, edit) -> None:
    path = models / ENCODER_WEIGHTS
    state_dict = torch.load(path, weights_only=True)
    edit(state_dict)
    torch.save(state_dict, path)


UNET_KEY = "conv_out.weight"
ENCODER_KEY = "text_model.final_layer_norm.weight"


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda sd: sd.pop(UNET_KEY), f"1 missing keys ({UNET_KEY})"),
        (
            lambda sd: sd.update({UNET_KEY: torch.zeros(3)}),
            f"shape-mismatched keys ({UNET_KEY} (3,)",
        ),
        (
            lambda sd: sd.update({"extra.weight": torch.zeros(2)}),
            "1 unexpected keys (extra.weight)",
        ),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_unet_checkpoint_mismatch(models: Path, edit, expected: str) -> None:
    _edit_unet(models, edit)
    with pytest.raises(CheckpointMismatch) as error:
        checkpoints.load_unet(models, torch.float32)
    message = _one_line(error)
    assert expected in message
    assert UNET_WEIGHTS in message and "arc2face-synth models download" in message


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda sd: sd.pop(ENCODER_KEY), "1 missing keys (final_layer_norm.weight)"),
        (
            lambda sd: sd.update({ENCODER_KEY: torch.zeros(3)}),
            "shape-mismatched keys (final_layer_norm.weight (3,)",
        ),
        (lambda sd: sd.update({"text_model.extra.weight": torch.zeros(2)}), "unexpected keys"),
    ],
    ids=["missing", "shape", "unexpected"],
)
def test_encoder_checkpoint_mismatch(models: Path, edit, expected: str) -> None:
    _edit_encoder(models, edit)
    with pytest.raises(CheckpointMismatch) as error:
        checkpoints.load_text_encoder(models, torch.float32)
    message = _one_line(error)
    assert expected in message and ENCODER_WEIGHTS in message


def test_truncated_checkpoint_is_a_mismatch(models: Path) -> None:
    path = models / "vae" / "diffusion_pytorch_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointMismatch, match=r"cannot read .*vae"):
        checkpoints.load_vae(models, torch.float32)


def test_bad_scheduler_config_is_a_mismatch(models: Path) -> None:
    (models / "scheduler" / "scheduler_config.json").write_text("{not json")
    with pytest.raises(CheckpointMismatch, match=r"scheduler_config\.json"):
        checkpoints.load_scheduler_config(models)


# --- the tiny parts plug into diffusers' pipelines ------------------------------------------------


def _pipeline_parts(root: Path) -> dict:
    return {
        "unet": checkpoints.load_unet(root, torch.float32),
        "text_encoder": checkpoints.load_text_encoder(root, torch.float32),
        "vae": checkpoints.load_vae(root, torch.float32),
        "tokenizer": checkpoints.load_tokenizer(root),
        "scheduler": PNDMScheduler.from_config(checkpoints.load_scheduler_config(root)),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }


def _generate(pipeline, **kwargs):
    pipeline.set_progress_bar_config(disable=True)
    return pipeline(
        "photo of a id person",
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(0),
        output_type="np",
        **kwargs,
    ).images


def test_lcm_lora_and_expression_adapter_load_and_change_the_output(pristine: Path) -> None:
    pipeline = StableDiffusionPipeline(**_pipeline_parts(pristine))
    base = _generate(pipeline)
    assert base.shape == (1, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, 3)

    pipeline.load_lora_weights(
        pristine / "lcm-lora", weight_name="pytorch_lora_weights.safetensors"
    )
    adapted = [m for m in pipeline.unet.modules() if hasattr(m, "lora_A") and m.lora_A]
    lora_file = load_file(pristine / "lcm-lora" / "pytorch_lora_weights.safetensors")
    assert len(adapted) == len([k for k in lora_file if k.endswith(".alpha")])
    assert abs(_generate(pipeline) - base).max() > 1e-3
    pipeline.unload_lora_weights()

    pipeline.load_ip_adapter(
        str(pristine),
        subfolder="exp_adapter",
        weight_name="exp_adapter.bin",
        image_encoder_folder=None,
    )
    expression = torch.randn(1, 1, EXPRESSION_DIM, generator=torch.Generator().manual_seed(1))
    embeds = torch.cat([torch.zeros_like(expression), expression])  # CFG: unconditional first
    assert abs(_generate(pipeline, ip_adapter_image_embeds=[embeds]) - base).max() > 1e-3


def test_controlnet_changes_the_output(pristine: Path) -> None:
    pipeline = StableDiffusionControlNetPipeline(
        controlnet=checkpoints.load_controlnet(pristine, torch.float32), **_pipeline_parts(pristine)
    )
    pose = torch.rand(
        1, 3, TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, generator=torch.Generator().manual_seed(2)
    )
    with_pose = _generate(pipeline, image=pose, controlnet_conditioning_scale=1.0)
    without = _generate(pipeline, image=pose, controlnet_conditioning_scale=0.0)
    assert abs(with_pose - without).max() > 1e-3
