"""Verify-stage throughput: insightface's FaceAnalysis image by image vs batched analysis.

Reference (the Arc2Face model card): `FaceAnalysis(name="antelopev2")`,
`prepare(ctx_id=0, det_size=(640, 640))`, then `app.get(image)` for one image at a time,
with all its defaults (it also runs every other model of the pack on each face). Ours:
`FaceAnalyzer` (onnxruntime, the CPU reference, detection per image and one batched
landmark and recognition call) and `TorchFaceAnalyzer` (the GPU path: everything batched,
fp16 on CUDA, fp32 on CPU) at each `--batch-sizes`. All on the full-size random stand-ins
(face_analysis_full: SCRFD-10G, IResNet-100, 1k3d68 with the real layer shapes), on
512x512 images made from insightface's sample photos, detection at 640x640.

    .venv/bin/python bench/bench_face.py --device cpu                 # < 2 min, 2 images
    .venv/bin/python bench/bench_face.py --device cuda --images 512 --batch-sizes 16,32,64
    .venv/bin/python bench/bench_face.py --device cuda --json face.json

Images/s count every image analysed (with or without a face); `faces` is how many of
them had one, `dets` how many faces were detected in all (random weights fire where they
fire, on all sides alike). The reference embeds and runs every pack model on every
detected face, ours only the largest face: images with several detections cost the
reference more. The CPU timing of the reference uses onnxruntime's default threads.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import cv2
import insightface
import numpy as np
import torch
from insightface.app import FaceAnalysis

from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer
from arc2face_engine.faces.records import FaceRecord
from arc2face_engine.faces.torch_analyzer import TorchFaceAnalyzer
from arc2face_engine.testing.full_size_faces import (
    IRESNET100_GFLOP,
    SCRFD_10G_GFLOP,
    write_full_size_antelopev2,
)

IMAGE_SIZE = 512  # Arc2Face's output
DET_SIZE = 640  # Arc2Face's demos

warnings.filterwarnings("ignore", message="`estimate` is deprecated", category=FutureWarning)


def sample_images(count: int) -> list[np.ndarray]:
    """`count` 512x512 RGB images cycled from insightface's sample photos."""
    folder = Path(insightface.__file__).parent / "data" / "images"
    photos = [
        cv2.imread(str(path))
        for path in sorted(folder.iterdir())
        if path.suffix in (".jpg", ".png")
    ]
    images = [cv2.resize(photo, (IMAGE_SIZE, IMAGE_SIZE))[:, :, ::-1] for photo in photos]
    return [np.ascontiguousarray(images[i % len(images)]) for i in range(count)]


def timed(run: Callable[[], list], device: str) -> tuple[float, list]:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def reference_run(root: Path, images: list[np.ndarray], device: str) -> tuple[float, int, int]:
    """The model card's usage: FaceAnalysis with its defaults, one image per call (BGR)."""
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"]
        if device == "cuda"
        else ["CPUExecutionProvider"]
    )
    app = FaceAnalysis(name="antelopev2", root=str(root), providers=providers)
    app.prepare(ctx_id=0, det_size=(DET_SIZE, DET_SIZE))
    frames = [image[:, :, ::-1].copy() for image in images]
    app.get(frames[0])  # warm-up
    seconds, faces = timed(lambda: [app.get(frame) for frame in frames], device)
    return seconds, sum(1 for found in faces if found), sum(len(found) for found in faces)


def ours_run(analyzer, images: list[np.ndarray], batch: int, device: str) -> tuple[float, int, int]:
    analyzer.analyze(images[:batch])  # warm-up (cuDNN autotuning, allocations)

    def run() -> list[FaceRecord]:
        records = []
        for start in range(0, len(images), batch):
            records += analyzer.analyze(images[start : start + batch])
        return records

    seconds, records = timed(run, device)
    faces = sum(1 for record in records if record.face_count)
    return seconds, faces, sum(record.face_count for record in records)


def hardware(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--images", type=int, default=None, help="default: 2 on cpu, 512 on cuda")
    parser.add_argument(
        "--reference-images",
        type=int,
        default=None,
        help="images for the image-by-image reference (default: --images, at most 64)",
    )
    parser.add_argument("--batch-sizes", default=None, help="default: 2 on cpu, 16,32,64 on cuda")
    parser.add_argument(
        "--threads", type=int, default=1, help="CPU threads (torch and onnxruntime)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = parser.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for but no CUDA GPU is visible: use --device cpu")
    torch.set_num_threads(args.threads)
    count = args.images or (512 if device == "cuda" else 2)
    reference_count = args.reference_images or min(count, 64)
    batches = [
        int(b) for b in (args.batch_sizes or ("16,32,64" if device == "cuda" else "2")).split(",")
    ]
    images = sample_images(count)

    root = Path(tempfile.mkdtemp(prefix="bench-face-"))
    try:
        models = root / "models"
        start = time.perf_counter()
        write_full_size_antelopev2(models / "antelopev2")
        print(f"full-size face stand-ins written in {time.perf_counter() - start:.1f} s")
        rows = []

        def add(runtime: str, batch: int | None, n: int, result: tuple[float, int, int]) -> None:
            seconds, faces, detections = result
            rows.append(
                {
                    "runtime": runtime,
                    "batch_size": batch,
                    "images": n,
                    "faces": faces,
                    "detections": detections,
                    "seconds": round(seconds, 3),
                    "images_per_s": round(n / seconds, 3),
                }
            )

        result = reference_run(root, images[:reference_count], device)
        add("insightface FaceAnalysis.get (model card)", 1, reference_count, result)
        if device == "cpu":
            analyzer = FaceAnalyzer.from_models_dir(
                models, providers=["CPUExecutionProvider"], det_size=DET_SIZE
            )
            result = ours_run(analyzer, images, batches[0], device)
            add(
                "FaceAnalyzer (onnxruntime, batched landmarks + recognition)",
                batches[0],
                count,
                result,
            )
            del analyzer
        analyzer = TorchFaceAnalyzer.from_models_dir(
            models, det_size=DET_SIZE, device=device, batch_size=max(batches)
        )
        precision = "fp16" if device == "cuda" else "fp32"
        for batch in batches:
            result = ours_run(analyzer, images, batch, device)
            add(f"TorchFaceAnalyzer ({device} {precision}, batched)", batch, count, result)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    reference_rate = rows[0]["images_per_s"]
    print(
        f"\nverify stage, full-size face stand-ins, {IMAGE_SIZE}px images, det {DET_SIZE}x{DET_SIZE}, "
        f"{hardware(device)}"
    )
    print(
        f"per image: SCRFD-10G {SCRFD_10G_GFLOP} GFLOP + per face IResNet-100 {IRESNET100_GFLOP} GFLOP + 1k3d68"
    )
    header = f"{'runtime':62} {'batch':>5} {'images':>6} {'faces':>5} {'dets':>5} {'s':>8} {'img/s':>8} {'x ref':>6}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row['runtime']:62} {row['batch_size'] or '-':>5} {row['images']:>6} {row['faces']:>5} {row['detections']:>5} "
            f"{row['seconds']:>8.2f} {row['images_per_s']:>8.2f} {row['images_per_s'] / reference_rate:>6.2f}"
        )
    if args.json:
        report = {
            "benchmark": "bench_face",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "device": device,
            "hardware": hardware(device),
            "det_size": DET_SIZE,
            "image_size": IMAGE_SIZE,
            "rows": rows,
        }
        args.json.write_text(json.dumps(report, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
