"""End-to-end throughput of a generation job, stage by stage, against the model card.

Every configuration (settings x batch size x compile) runs through the job's own worker
(`job.workers.worker_for`: the engine and face analyzer a shard task uses) and is timed
stage by stage on the same requests:

  generate  engine.generate (conditioning, denoising, VAE decode, copy to the host)
  codec     JPEG encode + decode of the stored bytes into the batch (the shard's IO pool)
  verify    analyzer.verify of the stored pixels, one call per batch
  sum       the three above one after another
  shard     one whole shard as the job runs it: generate -> verify -> write -> commit,
            with its overlaps (job.workers.generate_shard, no top-ups)

The reference is the model card's usage as written, in the same run: fresh eager modules
(no channels-last, no fused QKV, no compile), one identity per StableDiffusionPipeline
call with num_images_per_prompt=4, PIL output, then insightface's FaceAnalysis image by
image with its own defaults (det_size 640, its threshold, its providers).

    .venv/bin/python bench/bench_e2e.py                  # CPU: tiny models, < 2 minutes
    .venv/bin/python bench/bench_e2e.py --device cuda    # GPU: full-size random weights

On CUDA the models are SD 1.5-sized random weights (bench_engine.write_full_size_models)
and, when arc2face_engine.testing.full_size_faces is present, full-size random ONNX
stand-ins of SCRFD-10G, IResNet-100 and 1k3d68; on CPU the diffusion and the job's face
models are tiny, and a separate verify stage runs the full-size face stand-ins (when
present) on a few images. The table says which face models each row used.
TFLOP/s counts the generation FLOPs (torch's FlopCounterMode over one image) plus the
face models' (ONNX Conv/Gemm/MatMul) per image; % of peak is against the dense
fp16/bf16 tensor peak of known GPUs (--peak-tflops for others). `--save-throughput`
writes the best shard rate per settings for `arc2face-synth plan --throughput-table`.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch
from diffusers import DPMSolverMultistepScheduler, LCMScheduler, StableDiffusionPipeline
from insightface.app import FaceAnalysis
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import (
    describe_device,
    reference_usage,
    save_throughput,
    write_full_size_models,
)

from arc2face_engine.dataset.codec import decode_image_into, encode_image
from arc2face_engine.determinism import image_seed
from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer, default_providers
from arc2face_engine.generation import checkpoints
from arc2face_engine.generation.conditioning import IdentityConditioner
from arc2face_engine.generation.devices import resolve_device, resolve_dtype
from arc2face_engine.generation.settings import GenerationSettings, ImageRequest
from arc2face_engine.job import identities_step, lifecycle, workers
from arc2face_engine.job.shard import io_workers
from arc2face_engine.job.shards import shard_works
from arc2face_engine.testing import tiny_models
from schemas.job import JobSpec

try:  # full-size face stand-ins (branch gpu-face); the tiny face models otherwise
    from arc2face_engine.testing.full_size_faces import count_flops, write_full_size_antelopev2
except ImportError:  # pragma: no cover - depends on what is merged
    count_flops = write_full_size_antelopev2 = None

REFERENCE_IMAGES_PER_CALL = 4  # the model card's num_images_per_prompt
# Dense fp16/bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' data sheets.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "L4": 121.0}


@dataclass
class Row:
    settings: str
    batch: int
    compile: bool
    stage: str
    images: int
    seconds: float
    face_models: str
    flops_per_image: float = math.nan
    extra: dict = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.images / self.seconds if self.seconds else math.nan


@dataclass
class Context:
    args: argparse.Namespace
    device: torch.device
    models_dir: Path
    workdir: Path
    size: int
    face_models: str  # what the job's face analyzer runs: "tiny" or "full-size stand-ins"
    full_faces_dir: Path | None  # CPU: full-size stand-ins for the extra verify stage
    peak_tflops: float | None
    rows: list[Row] = field(default_factory=list)
    flops: dict[str, float] = field(default_factory=dict)  # generation FLOPs/image by settings


# --- models ------------------------------------------------------------------------------------


def prepare_models(args: argparse.Namespace, workdir: Path, device: torch.device) -> Context:
    full = args.full if args.full is not None else device.type == "cuda"
    models = workdir / "models"
    if full:
        write_full_size_models(models, device)
    else:
        tiny_models.write_tiny_models(models)
    full_faces = None
    face_models = "tiny"
    if write_full_size_antelopev2 is not None:
        if full:
            write_full_size_antelopev2(models / "antelopev2")
            face_models = "full-size stand-ins"
        else:
            full_faces = write_full_size_antelopev2(workdir / "full-faces" / "antelopev2")
    size = args.size or (512 if full else tiny_models.TINY_IMAGE_SIZE)
    return Context(
        args, device, models, workdir, size, face_models, full_faces, _peak(args, device)
    )


def _peak(args: argparse.Namespace, device: torch.device) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    if device.type != "cuda" or resolve_dtype(args.precision, device) == torch.float32:
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _face_flops(antelopev2: Path, det_size: int) -> float:
    """FLOPs per image of detection + landmarks + recognition of one face."""
    if count_flops is None:
        return math.nan
    import onnx

    shapes = {"scrfd_10g_bnkps.onnx": det_size, "1k3d68.onnx": 192, "arcface.onnx": 112}
    return float(
        sum(
            count_flops(onnx.load(str(antelopev2 / name)), (1, 3, side, side))
            for name, side in shapes.items()
        )
    )


# --- the job's side ------------------------------------------------------------------------------


def job_spec(ctx: Context, settings: GenerationSettings, batch: int, compiled: bool) -> JobSpec:
    out = ctx.workdir / f"ds-{settings.scheduler}-{batch}-{int(compiled)}-{time.monotonic_ns()}"
    return JobSpec.model_validate(
        {
            "name": "bench",
            "models": {"dir": str(ctx.models_dir), "precision": ctx.args.precision},
            "identities": {"source": "random", "count": batch // REFERENCE_IMAGES_PER_CALL},
            "variations": {"images_per_identity": REFERENCE_IMAGES_PER_CALL},
            "generation": {
                "scheduler": settings.scheduler,
                "steps": settings.num_inference_steps,
                "batch_size": batch,
                "compile": compiled,
                "height": ctx.size,
                "width": ctx.size,
            },
            "filter": {"max_attempts": 1},  # no top-ups: every config makes the same images
            "output": {"uri": str(out), "shard_size": batch},
            "compute": {"devices": [str(ctx.device)]},
        }
    )


def _requests(count: int) -> list[ImageRequest]:
    embeddings = np.random.default_rng(0).standard_normal((count, 512)).astype(np.float32)
    return [ImageRequest(e, image_seed(0, index, 0, 0)) for index, e in enumerate(embeddings)]


def _timed(run: Callable[[], object]) -> tuple[float, object]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    started = time.perf_counter()
    value = run()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started, value


def _warm(settings: GenerationSettings) -> GenerationSettings:
    return replace(settings, num_inference_steps=min(2, settings.num_inference_steps))


def generation_flops(engine, settings: GenerationSettings) -> float:
    """FLOPs of one image: conditioning, every denoising step (CFG included), decode."""
    with FlopCounterMode(display=False) as counter:
        engine.generate(_requests(1), settings)
    return float(counter.get_total_flops())


def bench_config(ctx: Context, name: str, settings: GenerationSettings, batch: int, compiled: bool) -> None:
    spec = job_spec(ctx, settings, batch, compiled)
    worker = workers.worker_for(spec, str(ctx.device))
    engine, analyzer = worker.engine, worker.analyzer
    requests = _requests(batch * ctx.args.batches)
    embeddings = np.stack([r.embedding for r in requests])
    batches = [requests[i : i + batch] for i in range(0, len(requests), batch)]
    # Warm-up outside the timings with the timed shapes (cuDNN autotuning, compilation
    # key on shapes, not on the step count).
    engine.generate(batches[0], _warm(settings))
    if not compiled and name not in ctx.flops:  # counted eagerly; compiled rows reuse it
        ctx.flops[name] = generation_flops(engine, settings)
    flops = ctx.flops.get(name, math.nan)
    seconds, images = _timed(lambda: np.concatenate([engine.generate(b, settings) for b in batches]))
    row = partial(Row, name, batch, compiled, face_models=ctx.face_models)
    ctx.rows.append(row("generate", len(images), seconds, flops_per_image=flops))

    with ThreadPoolExecutor(io_workers()) as pool:
        encoding = partial(encode_image, image_format="jpeg", quality=95)

        def codec() -> np.ndarray:
            encoded = list(pool.map(encoding, images))
            stored = np.empty_like(images)
            list(pool.map(decode_image_into, encoded, stored))
            return stored

        codec()
        codec_seconds, stored = _timed(codec)
    ctx.rows.append(row("codec", len(stored), codec_seconds))

    face_flops = _face_flops(ctx.models_dir / "antelopev2", analyzer_det_size(analyzer))

    def verify() -> int:
        return sum(
            len(analyzer.verify(stored[i : i + batch], embeddings[i : i + batch]))
            for i in range(0, len(stored), batch)
        )

    verify()
    verify_seconds, verified = _timed(verify)
    ctx.rows.append(row("verify", verified, verify_seconds, flops_per_image=face_flops))
    total = seconds + codec_seconds + verify_seconds
    ctx.rows.append(row("sum", len(images), total, flops_per_image=flops + face_flops))

    with lifecycle.writer_lease(spec) as lease:
        writer = lifecycle.prepare_dataset(spec, lease.token)
        table = identities_step.build_identities(spec, writer)
        work = next(shard_works(spec, table, lease.token))
        shard_seconds, result = _timed(
            lambda: workers.generate_shard(spec, work, str(ctx.device))
        )
    ctx.rows.append(row("shard", result.images, shard_seconds, flops_per_image=flops + face_flops))
    workers._WORKERS.clear()  # free this config's models before the next
    _free_memory()


def analyzer_det_size(analyzer) -> int:
    det_size = getattr(analyzer, "det_size", 640)
    return int(det_size[0] if isinstance(det_size, tuple) else det_size)


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    torch._dynamo.reset()


def bench_full_face_verify(ctx: Context) -> None:
    """CPU: the face models of a real job (full-size stand-ins) on a few images."""
    if ctx.full_faces_dir is None:
        return
    analyzer = FaceAnalyzer.from_models_dir(ctx.full_faces_dir.parent, det_size=640)
    count = ctx.args.full_face_images
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (count, 512, 512, 3), dtype=np.uint8)
    embeddings = rng.standard_normal((count, 512)).astype(np.float32)
    analyzer.verify(images[:1], embeddings[:1])
    seconds, verdicts = _timed(lambda: analyzer.verify(images, embeddings))
    flops = _face_flops(ctx.full_faces_dir, 640)
    ctx.rows.append(
        Row("512px images", count, False, "verify", len(verdicts), seconds,
            "full-size stand-ins", flops)
    )  # fmt: skip


# --- the model card's usage -------------------------------------------------------------------


def bench_reference(ctx: Context, name: str, settings: GenerationSettings) -> None:
    """Fresh eager modules, one identity per call, 4 images, FaceAnalysis per image."""
    dtype = resolve_dtype(ctx.args.precision, ctx.device)
    unet = checkpoints.load_unet(ctx.models_dir, dtype).to(ctx.device)
    vae = checkpoints.load_vae(ctx.models_dir, dtype).to(ctx.device)
    encoder = checkpoints.load_text_encoder(ctx.models_dir, dtype).to(ctx.device)
    tokenizer = checkpoints.load_tokenizer(ctx.models_dir)
    config = checkpoints.load_scheduler_config(ctx.models_dir)
    scheduler_class = LCMScheduler if settings.scheduler == "lcm" else DPMSolverMultistepScheduler
    pipeline = StableDiffusionPipeline(
        vae=vae, text_encoder=encoder, tokenizer=tokenizer, unet=unet,
        scheduler=scheduler_class.from_config(config), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    if settings.scheduler == "lcm":  # the LCM-LoRA model card: load, then fuse
        pipeline.load_lora_weights(str(ctx.models_dir / "lcm-lora"))
        pipeline.fuse_lora()
    conditioner = IdentityConditioner(encoder, tokenizer)  # Arc2Face's project_face_embs
    app = FaceAnalysis(name=str(ctx.models_dir / "antelopev2"), providers=default_providers())
    app.prepare(ctx_id=0, det_size=(640, 640))
    identities = max(1, ctx.args.reference_identities)
    embeddings = np.random.default_rng(0).standard_normal((identities, 512)).astype(np.float32)

    def encode(rows: np.ndarray) -> torch.Tensor:
        return conditioner.encode(torch.from_numpy(rows))

    def run(count: int, settings: GenerationSettings = settings) -> int:
        size = (ctx.size, ctx.size)
        return reference_usage(pipeline, encode, app, embeddings[:count], settings, size)

    run(1, _warm(settings))
    seconds, made = _timed(lambda: run(identities))
    ctx.rows.append(Row(name, REFERENCE_IMAGES_PER_CALL, False, "reference", made, seconds, ctx.face_models))
    _free_memory()


# --- table and JSON ------------------------------------------------------------------------------


def print_table(ctx: Context) -> None:
    print(
        f"device {describe_device(ctx.device)}, {ctx.size}x{ctx.size}, precision "
        f"{ctx.args.precision}, job face models: {ctx.face_models}, torch {torch.__version__}, "
        f"{os.cpu_count()} cores, {datetime.date.today().isoformat()}"
    )
    header = (
        f"{'settings':<26} {'batch':>5} {'compile':>7} {'stage':<9} {'images':>6} "
        f"{'seconds':>8} {'img/s':>8} {'TFLOP/s':>8} {'% peak':>7} {'vs ref':>7}  face models"
    )
    print(header)
    print("-" * len(header))
    references = {r.settings: r.rate for r in ctx.rows if r.stage == "reference"}
    for r in ctx.rows:
        tflops = r.flops_per_image * r.rate / 1e12 if not math.isnan(r.flops_per_image) else math.nan
        peak = f"{100 * tflops / ctx.peak_tflops:6.1f}%" if ctx.peak_tflops and tflops == tflops else "n/a"
        ref = references.get(r.settings)
        versus = f"{r.rate / ref:6.2f}x" if ref and r.stage in ("shard", "sum") else ""
        shown = f"{tflops:8.3f}" if tflops == tflops else f"{'-':>8}"
        print(
            f"{r.settings:<26} {r.batch:>5} {('on' if r.compile else 'off'):>7} {r.stage:<9} "
            f"{r.images:>6} {r.seconds:>8.2f} {r.rate:>8.2f} {shown} {peak:>7} {versus:>7}  "
            f"{r.face_models}"
        )


def throughput_records(ctx: Context, settings: dict[str, GenerationSettings]) -> list[dict]:
    """The best whole-shard rate per settings, in `plan --throughput-table`'s format."""
    records = []
    for name, setting in settings.items():
        shards = [r for r in ctx.rows if r.settings == _label(name, setting) and r.stage == "shard"]
        if not shards:
            continue
        best = max(shards, key=lambda r: r.rate)
        records.append(
            {
                "scheduler": setting.scheduler,
                "steps": setting.num_inference_steps,
                "height": ctx.size,
                "width": ctx.size,
                "images_per_s": round(best.rate, 3),
                "device": describe_device(ctx.device),
                "source": f"bench/bench_e2e.py shard stage, batch {best.batch}, compile "
                f"{'on' if best.compile else 'off'}, face models: {best.face_models}",
                "date": datetime.date.today().isoformat(),
            }
        )
    return records


def _label(name: str, settings: GenerationSettings) -> str:
    return f"{name} ({settings.num_inference_steps} steps, cfg {settings.guidance_scale:g})"


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--full", action=argparse.BooleanOptionalAction, default=None,
                        help="SD 1.5-sized random diffusion models (default: on CUDA)")  # fmt: skip
    parser.add_argument("--size", type=int, default=None, help="image side (64 tiny, 512 full)")
    parser.add_argument("--settings", nargs="+", choices=("default", "lcm"), default=["default", "lcm"])
    parser.add_argument("--steps", type=int, default=25, help="DPM-Solver++ steps")
    parser.add_argument("--lcm-steps", type=int, default=4)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=None,
                        help="default: 16 32 64 on CUDA, 16 on CPU")  # fmt: skip
    parser.add_argument("--compile", nargs="+", choices=("off", "on"), default=None,
                        help="default: off on (CUDA; on only at the largest batch), off (CPU)")  # fmt: skip
    parser.add_argument("--batches", type=int, default=None,
                        help="timed batches per config (default 2 CUDA, 1 CPU)")  # fmt: skip
    parser.add_argument("--reference-identities", type=int, default=None,
                        help="identities (x4 images) in the reference run (default 8 CUDA, 1 CPU)")  # fmt: skip
    parser.add_argument("--full-face-images", type=int, default=4,
                        help="CPU: images through the full-size face stand-ins")  # fmt: skip
    parser.add_argument("--peak-tflops", type=float, default=None)
    parser.add_argument("--json", type=Path, help="write every row here")
    parser.add_argument("--save-throughput", type=Path,
                        help="merge the best shard rates into this plan --throughput-table JSON")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> Context:
    args = parse_args(argv)
    device = resolve_device(args.device)
    cuda = device.type == "cuda"
    args.batch_sizes = args.batch_sizes or ([16, 32, 64] if cuda else [16])
    args.compile = args.compile or (["off", "on"] if cuda else ["off"])
    if args.reference_identities is None:
        args.reference_identities = 8 if cuda else 1
    if args.batches is None:
        args.batches = 2 if cuda else 1
    settings = {
        "default": GenerationSettings(num_inference_steps=args.steps),
        "lcm": GenerationSettings.lcm(steps=args.lcm_steps),
    }
    with tempfile.TemporaryDirectory(prefix="arc2face-e2e-") as workdir:
        ctx = prepare_models(args, Path(workdir), device)
        chosen = {
            name: GenerationSettings(**{**asdict(settings[name]), "height": ctx.size, "width": ctx.size})
            for name in args.settings
        }
        for name, setting in chosen.items():
            label = _label(name, setting)
            bench_reference(ctx, label, setting)
            for batch in args.batch_sizes:
                for compiled in ("off", "on"):
                    if compiled not in args.compile:
                        continue
                    if compiled == "on" and cuda and batch != max(args.batch_sizes):
                        continue  # each compile costs minutes of the GPU run: largest batch only
                    bench_config(ctx, label, setting, batch, compiled == "on")
        bench_full_face_verify(ctx)
        print_table(ctx)
        if args.json:
            rows = [{**asdict(r), "images_per_s": r.rate} for r in ctx.rows]
            args.json.write_text(json.dumps(rows, indent=2, default=str) + "\n")
        if args.save_throughput:
            save_throughput(args.save_throughput, throughput_records(ctx, chosen))
    return ctx


if __name__ == "__main__":
    main()
