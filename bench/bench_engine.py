"""Engine throughput vs Arc2Face's reference usage, generation + ArcFace verification.

Reference (the Arc2Face model card): one identity per pipeline call,
`num_images_per_prompt=4`, PIL output, then insightface's `FaceAnalysis.get` on each
image. Engine: mixed-identity batches of `--batch-size` images through
`Arc2FaceEngine.generate`, verified batch by batch with `FaceAnalyzer.verify`. Both
sides share the same loaded modules, settings, image count and run; the table gives
images/s for both and their ratio, for the default settings (DPM-Solver++, 25 steps,
guidance 3.0) and for LCM-LoRA (4 steps, guidance 1.0).

    .venv/bin/python bench/bench_engine.py                      # tiny models, CPU
    .venv/bin/python bench/bench_engine.py --full --device cuda --identities 64 --batch-size 64
    .venv/bin/python bench/bench_engine.py --models-dir ./models --device cuda   # real weights

`--full` writes SD 1.5-sized random models (UNet 320-640-1280-1280 with 768-wide cross
attention, CLIP ViT-L/14 text tower, SD VAE) into a temp models dir; the face models stay
tiny (no real antelopev2 can be made), so on random weights verification measures the
detector pass only, on both sides alike. On CPU the engine runs one image per forward
(bit-exact batch invariance, see generation/engine.py), so CPU ratios show little gain.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from insightface.app import FaceAnalysis

from arc2face_engine.determinism import image_seed
from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer, default_providers
from arc2face_engine.generation.devices import resolve_device
from arc2face_engine.generation.engine import Arc2FaceEngine
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from arc2face_engine.testing import tiny_models
from arc2face_engine.testing.full_size_models import write_full_size_models

REFERENCE_IMAGES_PER_CALL = 4  # the model card's num_images_per_prompt


# --- models ------------------------------------------------------------------------------------


# --- the two sides -------------------------------------------------------------------------------


@dataclass
class Timing:
    images: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.images / self.seconds


def _timed(run: Callable[[], int]) -> Timing:
    started = time.perf_counter()
    images = run()
    return Timing(images, time.perf_counter() - started)


def reference_pipeline(engine: Arc2FaceEngine, scheduler: str) -> StableDiffusionPipeline:
    """A plain StableDiffusionPipeline over the engine's modules, as the model card
    builds it (safety checker off, the SD 1.5 scheduler config turned into DPM-Solver++,
    or LCM with the LCM-LoRA, here already fused in the engine's LCM UNet)."""
    pipeline = engine.variants[scheduler].pipeline
    scheduler_copy = copy.deepcopy(pipeline.scheduler)
    reference = StableDiffusionPipeline(
        vae=pipeline.vae,
        text_encoder=pipeline.text_encoder,
        tokenizer=pipeline.tokenizer,
        unet=pipeline.unet,
        scheduler=scheduler_copy,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    reference.set_progress_bar_config(disable=True)
    return reference


def run_reference(
    engine: Arc2FaceEngine,
    app: FaceAnalysis,
    embeddings: np.ndarray,
    settings: GenerationSettings,
) -> int:
    pipeline = reference_pipeline(engine, settings.scheduler)
    size = (settings.height, settings.width)
    return reference_usage(pipeline, engine.encode_identities, app, embeddings, settings, size)


def reference_usage(
    pipeline: StableDiffusionPipeline,
    encode: Callable[[np.ndarray], torch.Tensor],
    app: FaceAnalysis,
    embeddings: np.ndarray,
    settings: GenerationSettings,
    size: tuple[int, int],
) -> int:
    """The model card's loop as written: one identity per call (`encode` is its
    project_face_embs), 4 images, then FaceAnalysis on each image; returns the image count."""
    count = 0
    for embedding in embeddings:
        images = pipeline(
            prompt_embeds=encode(embedding[None]),
            num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale,
            num_images_per_prompt=REFERENCE_IMAGES_PER_CALL,
            height=size[0],
            width=size[1],
        ).images
        for image in images:
            app.get(np.array(image)[:, :, ::-1])  # insightface takes BGR
            count += 1
    return count


def run_engine(
    engine: Arc2FaceEngine,
    analyzer: FaceAnalyzer,
    embeddings: np.ndarray,
    settings: GenerationSettings,
    batch_size: int,
) -> int:
    requests = [
        ImageRequest(embeddings[identity], image_seed(0, identity, variant, 0))
        for variant in range(REFERENCE_IMAGES_PER_CALL)
        for identity in range(len(embeddings))  # identities interleaved in every batch
    ]
    # Verification of one batch (onnxruntime, GIL released) overlaps the generation of
    # the next (torch, GIL released): the GPU does not wait for the face models.
    with ThreadPoolExecutor(max_workers=1) as verifier:
        pending = []
        for start in range(0, len(requests), batch_size):
            batch = requests[start : start + batch_size]
            images = engine.generate(batch, settings)
            identities = np.stack([request.embedding for request in batch])
            pending.append(verifier.submit(analyzer.verify, images, identities))
        verdicts = [verdict for future in pending for verdict in future.result()]
    return len(verdicts)


# --- main ----------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models-dir", type=Path, help="existing models dir (default: build one)")
    parser.add_argument("--full", action="store_true", help="SD 1.5-sized random models, 512px")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--identities", type=int, default=None, help="default 2 tiny, 64 full")
    parser.add_argument("--batch-size", type=int, default=None, help="default 16 CPU, 64 GPU")
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    parser.add_argument("--lcm-steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=None, help="image size (64 tiny, 512 full)")
    parser.add_argument(
        "--settings", nargs="+", choices=("default", "lcm"), default=["default", "lcm"]
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the UNet")
    parser.add_argument(
        "--save-throughput",
        type=Path,
        help="append the engine's measured images/s to this JSON file "
        "(read by `arc2face-synth plan --throughput-table`)",
    )
    return parser.parse_args()


def prepare_models(args: argparse.Namespace, workdir: Path, device: torch.device) -> Path:
    if args.models_dir is not None:
        return args.models_dir
    if args.full:
        return write_full_size_models(workdir / "models", device)
    return tiny_models.write_tiny_models(workdir / "models")


def bench(args: argparse.Namespace, models_dir: Path) -> list[tuple[str, Timing, Timing]]:
    large = args.full or args.models_dir is not None
    size = args.size or (512 if large else tiny_models.TINY_IMAGE_SIZE)
    identities = args.identities or (64 if large else 2)
    engine = Arc2FaceEngine.from_pretrained(
        models_dir,
        device=args.device,
        precision=args.precision,
        lcm="lcm" in args.settings,
        compile=args.compile,
    )
    batch_size = args.batch_size or (16 if engine.device.type == "cpu" else 64)
    providers = default_providers()
    det_size = min(640, size)  # as the job runner: small images are not upsampled
    analyzer = FaceAnalyzer.from_models_dir(models_dir, providers=providers, det_size=det_size)
    app = FaceAnalysis(name=str(models_dir / "antelopev2"), providers=providers)
    app.prepare(ctx_id=0, det_size=(det_size, det_size))
    embeddings = np.random.default_rng(0).standard_normal((identities, 512)).astype(np.float32)
    all_settings = {
        "default": GenerationSettings(num_inference_steps=args.steps, height=size, width=size),
        "lcm": GenerationSettings.lcm(steps=args.lcm_steps, height=size, width=size),
    }
    rows = []
    measured: list[dict] = []
    for name in args.settings:
        settings = all_settings[name]
        # Warm-up outside the timings, both sides, with every batch shape the timed runs
        # use (cuDNN autotuning and torch.compile specialise on shapes).
        warm = replace(settings, num_inference_steps=min(2, settings.num_inference_steps))
        run_reference(engine, app, embeddings[:1], warm)
        run_engine(engine, analyzer, embeddings, warm, batch_size)
        reference = _timed(lambda s=settings: run_reference(engine, app, embeddings, s))
        engine_timing = _timed(
            lambda s=settings: run_engine(engine, analyzer, embeddings, s, batch_size)
        )
        label = f"{name} ({settings.scheduler}, {settings.num_inference_steps} steps, cfg {settings.guidance_scale:g})"
        rows.append((label, reference, engine_timing))
        measured.append(
            {
                "scheduler": settings.scheduler,
                "steps": settings.num_inference_steps,
                "height": size,
                "width": size,
                "images_per_s": round(engine_timing.rate, 3),
                "device": describe_device(engine.device),
                "source": "bench/bench_engine.py" + (" --full" if args.full else ""),
                "date": datetime.date.today().isoformat(),
            }
        )
    print(
        f"device {engine.device}, {size}x{size}, {identities} identities x "
        f"{REFERENCE_IMAGES_PER_CALL} images, engine batch {batch_size}, models {models_dir}"
    )
    if args.save_throughput:
        save_throughput(args.save_throughput, measured)
    return rows


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({os.cpu_count()} cores)"


def save_throughput(path: Path, records: list[dict]) -> None:
    """Keep one record per (scheduler, steps, size): newer measurements replace older."""
    existing = json.loads(path.read_text()) if path.exists() else []
    keys = {(r["scheduler"], r["steps"], r["height"], r["width"]) for r in records}
    kept = [
        r for r in existing if (r["scheduler"], r["steps"], r["height"], r["width"]) not in keys
    ]
    path.write_text(json.dumps(kept + records, indent=2) + "\n")
    print(f"throughput written to {path}")


def print_table(rows: list[tuple[str, Timing, Timing]]) -> None:
    header = (
        f"{'settings':<42} {'images':>6} {'reference img/s':>16} {'engine img/s':>13} {'ratio':>6}"
    )
    print(header)
    print("-" * len(header))
    for label, reference, engine in rows:
        print(
            f"{label:<42} {engine.images:>6} {reference.rate:>16.2f} "
            f"{engine.rate:>13.2f} {engine.rate / reference.rate:>5.2f}x"
        )


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)
    with tempfile.TemporaryDirectory(prefix="arc2face-bench-") as workdir:
        models_dir = prepare_models(args, Path(workdir), device)
        print_table(bench(args, models_dir))


if __name__ == "__main__":
    main()
