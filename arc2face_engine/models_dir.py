"""The models directory: which files each component needs, where they come from, checksums.

The layout is the one published by Arc2Face (see ARCHITECTURE.md, "Models directory"):
Arc2Face's own UNet / encoder / ControlNet / expression adapter / ArcFace next to the
Stable Diffusion 1.5 VAE, tokenizer and scheduler config, insightface's antelopev2 pack
and, optionally, the LCM-LoRA and SMIRK. The directory is always local: diffusers,
transformers and onnxruntime read their weights from local paths.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from schemas.errors import ModelFileCorrupt, ModelFileMissing, UserError, first_line

CHECKSUMS_FILE = "checksums.json"

ARC2FACE_REPO = "FoivosPar/Arc2Face"
SD15_REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
LCM_LORA_REPO = "latent-consistency/lcm-lora-sdv1-5"
ANTELOPEV2_PACK = "antelopev2"

# insightface's antelopev2 pack minus its recognition model (glintr100.onnx):
# Arc2Face replaces recognition with its own arcface.onnx.
ANTELOPEV2_PACK_FILES = ("scrfd_10g_bnkps.onnx", "1k3d68.onnx", "2d106det.onnx", "genderage.onnx")

# Files kept at the same path as in their Hub repository (listed once, used by both tables).
_ARC2FACE_CORE_FILES = (
    "arc2face/config.json",
    "arc2face/diffusion_pytorch_model.safetensors",
    "encoder/config.json",
    "encoder/pytorch_model.bin",
)
_SD15_CORE_FILES = (
    "vae/config.json",
    "vae/diffusion_pytorch_model.safetensors",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer/tokenizer_config.json",
    "tokenizer/special_tokens_map.json",
    "scheduler/scheduler_config.json",
)
_CONTROLNET_FILES = ("controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors")
_EXPRESSION_FILES = ("exp_adapter/exp_adapter.bin",)

COMPONENT_FILES: dict[str, tuple[str, ...]] = {
    "core": (
        *_ARC2FACE_CORE_FILES,
        *_SD15_CORE_FILES,
        *(f"antelopev2/{name}" for name in ANTELOPEV2_PACK_FILES),
        "antelopev2/arcface.onnx",
    ),
    "controlnet": _CONTROLNET_FILES,
    "expression": _EXPRESSION_FILES,
    "lcm": ("lcm-lora/pytorch_lora_weights.safetensors",),
    "smirk": ("smirk/SMIRK_em1.pt", "smirk/face_landmarker.task"),
}
COMPONENTS = tuple(COMPONENT_FILES)
# SMIRK is distributed through Google Drive and MediaPipe's bucket, not the Hub.
DOWNLOADABLE_COMPONENTS = ("core", "controlnet", "expression", "lcm")


@dataclass(frozen=True)
class HubFile:
    """One file of the models directory that hf_hub_download can fetch."""

    repo_id: str
    filename: str  # path inside the Hub repository
    local_dir: str = ""  # folder of the models directory that receives `filename`

    @property
    def local_path(self) -> str:
        return f"{self.local_dir}/{self.filename}" if self.local_dir else self.filename


def _same_path_in(repo_id: str, *paths: str) -> tuple[HubFile, ...]:
    return tuple(HubFile(repo_id, path) for path in paths)


HUB_FILES: dict[str, tuple[HubFile, ...]] = {
    "core": (
        *_same_path_in(ARC2FACE_REPO, *_ARC2FACE_CORE_FILES),
        HubFile(ARC2FACE_REPO, "arcface.onnx", "antelopev2"),
        *_same_path_in(SD15_REPO, *_SD15_CORE_FILES),
    ),
    "controlnet": _same_path_in(ARC2FACE_REPO, *_CONTROLNET_FILES),
    "expression": _same_path_in(ARC2FACE_REPO, *_EXPRESSION_FILES),
    "lcm": (HubFile(LCM_LORA_REPO, "pytorch_lora_weights.safetensors", "lcm-lora"),),
}


class UnknownComponent(UserError, ValueError):
    """A model component name that the models directory does not know."""


def _check_components(names: Iterable[str]) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        if name not in COMPONENTS:
            raise UnknownComponent(
                f"unknown model component {name!r}: choose from {', '.join(COMPONENTS)}"
            )
    return names


def fetch_hint(root: str | os.PathLike, component: str) -> str:
    """The command (or manual step) that puts `component`'s files into `root`."""
    if component == "smirk":
        return (
            f"place SMIRK_em1.pt (github.com/georgeretsi/smirk) and MediaPipe's "
            f"face_landmarker.task in {Path(root) / 'smirk'}"
        )
    with_flag = "" if component == "core" else f" --with {component}"
    return f"run `arc2face-synth models download {root}{with_flag}`"


def require(root: str | os.PathLike, component: str, *, under: str | None = None) -> None:
    """Raise ModelFileMissing for the first file of `component` (optionally only those
    in folder `under`) that `root` lacks; the message names the file and the fix."""
    _check_components([component])
    for relative in COMPONENT_FILES[component]:
        if under is not None and not relative.startswith(f"{under}/"):
            continue
        if not (Path(root) / relative).is_file():
            raise ModelFileMissing(
                f"missing model file {Path(root) / relative}: {fetch_hint(root, component)}"
            )


# --- readability ------------------------------------------------------------------------




def _open_safetensors(path: Path) -> None:
    from safetensors import safe_open

    # The header lists every tensor's byte range; safetensors checks they cover the file,
    # so a truncated download fails here without reading the weights.
    with safe_open(str(path), framework="pt") as handle:
        handle.keys()


def _open_torch_zip(path: Path) -> None:
    import torch

    # mmap: the zip directory and pickle are read, tensor bytes are not.
    torch.load(path, map_location="cpu", mmap=True, weights_only=True)


def _open_onnx(path: Path) -> None:
    import onnx

    onnx.load_model(str(path), load_external_data=False)


def _open_json(path: Path) -> None:
    json.loads(path.read_text(encoding="utf-8"))


def _open_tokenizer(folder: Path) -> None:
    from transformers import CLIPTokenizer

    CLIPTokenizer.from_pretrained(folder)


_OPENERS = {
    ".safetensors": ("safetensors", _open_safetensors),
    ".bin": ("PyTorch checkpoint", _open_torch_zip),
    ".pt": ("PyTorch checkpoint", _open_torch_zip),
    ".onnx": ("ONNX model", _open_onnx),
    ".json": ("JSON", _open_json),
}


def check_model_files(root: str | os.PathLike, components: Iterable[str] = ("core",)) -> None:
    """Open every file of `components` the way its loader will (headers, zip directories,
    protobufs, JSON, the tokenizer) and raise ModelFileCorrupt for the first that does not
    open: a truncated or wrong file fails here, before a job writes anything, instead of
    inside a shard. Missing files raise ModelFileMissing (see `require`)."""
    root = Path(root)
    for component in _check_components(components):
        require(root, component)
        for relative in COMPONENT_FILES[component]:
            kind, opener = _OPENERS.get(Path(relative).suffix, (None, None))
            if opener is not None:
                _try_open(root, relative, component, kind, opener)
        if component == "core":
            _try_open(root, "tokenizer", component, "CLIP tokenizer", _open_tokenizer)


def _try_open(root: Path, relative: str, component: str, kind: str, opener) -> None:
    try:
        opener(root / relative)
    except (ModelFileMissing, MemoryError):
        raise
    except Exception as error:  # every parser has its own error types
        raise ModelFileCorrupt(
            f"model file {root / relative} does not open as {kind} ({first_line(error)}): "
            f"it is truncated or corrupt; {fetch_hint(root, component)} to fetch it again"
        ) from None


# --- checksums -------------------------------------------------------------------------


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _model_files(root: Path) -> list[str]:
    """Relative paths of every file in `root`, except checksums.json and hidden folders
    (hf_hub_download keeps its bookkeeping in `.cache/`)."""
    found = []
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        if not path.is_file() or relative == CHECKSUMS_FILE:
            continue
        if any(part.startswith(".") for part in path.relative_to(root).parts):
            continue
        found.append(relative)
    return found


# (absolute path, size, mtime_ns) -> sha256; hashing GBs of weights twice is not cheap.
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


def _cached_sha256(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _HASH_CACHE:
        _HASH_CACHE[key] = _sha256(path)
    return _HASH_CACHE[key]


def component_hashes(root: str | os.PathLike, components: Iterable[str]) -> dict[str, str]:
    """{relative path: sha256} of the files of `components`: the files that decide pixels."""
    root = Path(root)
    return {
        relative: _cached_sha256(root / relative)
        for component in _check_components(components)
        for relative in COMPONENT_FILES[component]
        if (root / relative).is_file()
    }


def file_hashes(root: str | os.PathLike, under: str | None = None) -> dict[str, str]:
    """{relative path: sha256} of every model file in `root` (dataset.json provenance), or
    of those in its folder `under` (an import uses only the face pack)."""
    root = Path(root)
    prefix = f"{under.strip('/')}/" if under else ""
    return {
        relative: _cached_sha256(root / relative)
        for relative in _model_files(root)
        if relative.startswith(prefix)
    }


def write_checksums(root: str | os.PathLike) -> Path:
    """Record the sha256 of every file in `root` in root/checksums.json."""
    root = Path(root)
    # Fresh hashes, not cached ones: this file is what later verification trusts.
    checksums = {relative: _sha256(root / relative) for relative in _model_files(root)}
    target = root / CHECKSUMS_FILE
    target.write_text(json.dumps(checksums, indent=2, sort_keys=True) + "\n")
    return target


def read_checksums(root: str | os.PathLike) -> dict[str, str] | None:
    path = Path(root) / CHECKSUMS_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _component_of(relative: str) -> str:
    """The component whose files include `relative` ("core" for files no component lists)."""
    for component, files in COMPONENT_FILES.items():
        if relative in files:
            return component
    return "core"


def verify_models(root: str | os.PathLike, components: Iterable[str] = ("core",)) -> list[str]:
    """Problems with `root`: every file checksums.json records must exist with that sha256,
    whatever `components`; the files of `components` are required even when unrecorded
    (missing, or present without a recorded checksum). Empty when fine."""
    root = Path(root)
    components = _check_components(components)
    if not root.is_dir():
        return [
            f"no models directory at {root}: run `arc2face-synth models download {root}` "
            f"(real weights) or `arc2face-synth models tiny {root}` (test models)"
        ]
    recorded = read_checksums(root)
    problems = []
    if recorded is None:
        problems.append(f"no {CHECKSUMS_FILE} in {root}: {fetch_hint(root, 'core')}")
        recorded = {}
    required = {
        relative: component for component in components for relative in COMPONENT_FILES[component]
    }
    to_check = dict.fromkeys(required, None) | dict.fromkeys(recorded, None)
    for relative in to_check:
        component = required.get(relative) or _component_of(relative)
        path = root / relative
        if not path.is_file():
            problems.append(f"missing {relative}: {fetch_hint(root, component)}")
        elif relative not in recorded:
            problems.append(f"no recorded checksum for {relative}")
        elif _sha256(path) != recorded[relative]:
            problems.append(f"sha256 mismatch for {relative}: {fetch_hint(root, component)}")
    return problems


# --- download ------------------------------------------------------------------------


class ModelDownloadFailed(UserError, ConnectionError):
    """The Hugging Face Hub (or insightface's release server) could not be reached."""


def _unreachable(what: str, root: Path, why: str) -> ModelDownloadFailed:
    return ModelDownloadFailed(
        f"cannot download {what}: {why}; connect this machine to the internet (or set "
        f"HF_ENDPOINT to a reachable Hub mirror) and re-run `arc2face-synth models download "
        f"{root}` (files already downloaded are kept), or copy a models folder downloaded "
        f"elsewhere to {root}"
    )


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")


def _hub_unreachable() -> str | None:
    """Why the Hub cannot be reached, from one TCP connection to its endpoint (the Hub
    client would retry for half a minute first); None when it can, or when a proxy is set
    (only a request through it could tell)."""
    from urllib.parse import urlsplit

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set (unset it to download)"
    if any(os.environ.get(name) for name in PROXY_VARIABLES):
        return None
    endpoint = urlsplit(constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        with socket.create_connection((endpoint.hostname, port), timeout=10):
            return None
    except OSError as error:
        return (
            f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached "
            f"({first_line(error)[:80]}): no network?"
        )


def _download_hub_files(root: Path, component: str) -> None:
    # Imported here so that reading a models directory never needs the Hub client.
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    for hub_file in HUB_FILES[component]:
        try:
            hf_hub_download(
                repo_id=hub_file.repo_id,
                filename=hub_file.filename,
                local_dir=root / hub_file.local_dir if hub_file.local_dir else root,
            )
        except (LocalEntryNotFoundError, OfflineModeIsEnabled):
            # The Hub client's "not in the local cache" after it failed to connect: no
            # network, or offline mode (a FileNotFoundError, which is not about a path).
            why = (
                "HF_HUB_OFFLINE is set (unset it to download)"
                if constants.HF_HUB_OFFLINE
                else f"the Hugging Face Hub ({constants.ENDPOINT}) cannot be reached: no network?"
            )
            raise _unreachable(f"{hub_file.repo_id}/{hub_file.filename}", root, why) from None


def _download_antelopev2_pack(root: Path) -> None:
    """Fetch insightface's antelopev2 pack with insightface's own helper and keep the
    detection, landmark and attribute models."""
    target = root / "antelopev2"
    if all((target / name).is_file() for name in ANTELOPEV2_PACK_FILES):
        return
    import requests
    from insightface.utils import storage

    with tempfile.TemporaryDirectory() as scratch:
        try:
            pack_dir = Path(storage.ensure_available("models", ANTELOPEV2_PACK, root=scratch))
        except (requests.ConnectionError, requests.Timeout) as error:
            why = f"its release server cannot be reached ({first_line(error)[:120]}): no network?"
            raise _unreachable(f"insightface's {ANTELOPEV2_PACK} pack", root, why) from None
        target.mkdir(parents=True, exist_ok=True)
        for name in ANTELOPEV2_PACK_FILES:
            # Some releases of the zip nest the files one folder deeper.
            matches = sorted(pack_dir.rglob(name))
            if not matches:
                raise ModelFileMissing(
                    f"insightface's {ANTELOPEV2_PACK} pack has no {name}: "
                    f"place it in {target} by hand"
                )
            shutil.copyfile(matches[0], target / name)


def download_models(root: str | os.PathLike, with_: Iterable[str] = ()) -> Path:
    """Download the core models plus the optional components `with_` into `root`, then
    record the sha256 of every file in root/checksums.json. Returns `root`."""
    root = Path(root)
    optional = _check_components(with_)
    for component in optional:
        if component not in DOWNLOADABLE_COMPONENTS:
            raise UnknownComponent(
                f"model component {component!r} is not on the Hugging Face Hub: "
                f"{fetch_hint(root, component)}"
            )
    unreachable = _hub_unreachable()
    if unreachable:  # before anything is written
        raise _unreachable("the models from the Hugging Face Hub", root, unreachable)
    root.mkdir(parents=True, exist_ok=True)
    for component in dict.fromkeys(["core", *optional]):
        _download_hub_files(root, component)
        if component == "core":
            _download_antelopev2_pack(root)
    write_checksums(root)
    return root
