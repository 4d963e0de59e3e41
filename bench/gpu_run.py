"""The one GPU command: everything worth measuring on one GPU, in priority order, in about
five minutes, on full-size random-weight stand-ins (no weights reach a bench machine).

    python bench/gpu_run.py                 # on the GPU machine; results under $OUT
    python bench/gpu_run.py --dry-run       # the same steps on CPU with tiny models (CI)

A bare GPU image (Python 3.12, a CUDA torch, transformers; no diffusers, insightface,
Prefect, pydantic, pyarrow, OpenCV or onnxruntime) gets what the steps need from the
wheels in `.whl/` (bench/fetch_gpu_wheels.sh downloads exactly those, here), installed
with `pip --no-index --no-deps` before anything is imported. The steps import only the
engine, the torch face analyzer and the stand-in writers (see tests/test_layering.py).

Steps, each written to $OUT/gpu_run.json and $OUT/gpu_run.md as soon as it ends (a stop
keeps what ran); a failing step is recorded and the next one runs:

 1. smoke: load, generate and verify a few images (30 s)
 2. reference: the model card's usage (one identity per pipeline call, 4 images, PIL
    output, face analysis image by image), default settings
 3. eager batch 64, default settings and LCM 4 steps (generate + verify)
 4. face analysis on CUDA, fp16 and fp32, against the CPU reference (onnxruntime when it
    is installed, else the torch runner on CPU in fp32, which the tests hold equal to it)
 5. compiled batch 64 (only the bucket a 64-image batch uses), default settings
 6. eager batches 16 and 32, default settings
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
# What the steps import that a bare GPU image lacks (bench/fetch_gpu_wheels.sh lists the
# wheels that provide them).
NEEDED = ("diffusers", "peft", "accelerate", "onnx", "insightface", "PIL")


# Installed versions older than these are replaced by the carried wheel (diffusers 0.42
# needs huggingface_hub >= 1.32; an image's transformers 5.17 may have brought an older one).
MINIMUM = {"huggingface_hub": "1.32"}


def install_carried_wheels() -> None:
    """Install the carried wheels (.whl/) that the image lacks, without an index and without
    resolving: the image's torch and transformers stay as they are."""
    from importlib import metadata

    from packaging.version import Version

    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if not missing:
        return
    wanted = []
    for wheel in sorted(WHEELS.glob("*.whl")):
        name = wheel.name.split("-")[0]
        try:
            installed = metadata.version(name)
        except metadata.PackageNotFoundError:
            wanted.append(str(wheel))
            continue
        if name in MINIMUM and Version(installed) < Version(MINIMUM[name]):
            wanted.append(str(wheel))
    if not wanted:
        sys.exit(f"{', '.join(missing)} missing and no wheels for them in {WHEELS}: "
                 "run bench/fetch_gpu_wheels.sh")  # fmt: skip
    print(f"installing {len(wanted)} carried wheels for {', '.join(missing)}", flush=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "-q", *wanted],
        check=True,
    )
    importlib.invalidate_caches()


@dataclass
class Report:
    """Every step's outcome, rewritten to JSON and Markdown after each step."""

    out: Path
    meta: dict
    steps: list[dict] = field(default_factory=list)

    def add(self, step: dict) -> None:
        self.steps.append(step)
        self.out.mkdir(parents=True, exist_ok=True)
        payload = {"meta": self.meta, "steps": self.steps}
        (self.out / "gpu_run.json").write_text(json.dumps(payload, indent=2) + "\n")
        (self.out / "gpu_run.md").write_text(self.table() + "\n")
        print(self.row(step), flush=True)

    @staticmethod
    def row(step: dict) -> str:
        rate = f"{step['images_per_s']:.2f}" if step.get("images_per_s") else "-"
        note = step.get("note", "")
        return (
            f"| {step['step']} | {step['status']} | {step.get('images', '-')} | "
            f"{step['seconds']:.1f} | {rate} | {note} |"
        )

    def table(self) -> str:
        lines = [
            f"device: {self.meta['device']}; torch {self.meta['torch']}; {self.meta['date']}",
            "",
            "| step | status | images | seconds | images/s | note |",
            "|---|---|---|---|---|---|",
        ]
        return "\n".join(lines + [self.row(step) for step in self.steps])


def timed_step(report: Report, name: str, run: Callable[[], dict]) -> None:
    started = time.perf_counter()
    try:
        result = run()
        status = "ok"
    except Exception as error:  # a failed step is recorded; the next one still runs
        traceback.print_exc()
        result, status = {"note": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}, "failed"
    seconds = time.perf_counter() - started
    step = {"step": name, "status": status, "seconds": round(seconds, 2), **result}
    if step.get("images") and step.get("timed_seconds"):
        step["images_per_s"] = round(step["images"] / step["timed_seconds"], 3)
    report.add(step)


# --- the workload -------------------------------------------------------------------------


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


class Bench:
    """Models, engine and analyzers, built once and shared by the steps."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        import numpy as np
        import torch

        self.np, self.torch = np, torch
        self.args = args
        self.device = torch.device("cpu" if args.dry_run else "cuda")
        self.size = 64 if args.dry_run else 512
        self.steps = 2 if args.dry_run else 25
        self.batch = 4 if args.dry_run else 64
        self.models_dir = self._write_models(workdir)
        self._engines: dict[bool, object] = {}
        self.skin_tone = all(_importable(name) for name in ("skimage", "insightface"))
        self.analyzer = self._torch_analyzer(self.device, None)

    def _write_models(self, workdir: Path) -> Path:
        from arc2face_engine.testing import tiny_models

        if self.args.dry_run:
            return tiny_models.write_tiny_models(workdir / "models")
        from arc2face_engine.testing.full_size_faces import write_full_size_antelopev2
        from arc2face_engine.testing.full_size_models import write_full_size_models

        root = write_full_size_models(workdir / "models", self.device)
        write_full_size_antelopev2(root / "antelopev2")  # SCRFD-10G, IResNet-100, 1k3d68
        return root

    def settings(self, lcm: bool = False, steps: int | None = None):
        from arc2face_engine.generation.settings import GenerationSettings

        if lcm:
            return GenerationSettings.lcm(steps=steps or 4, height=self.size, width=self.size)
        return GenerationSettings(
            num_inference_steps=steps or self.steps, height=self.size, width=self.size
        )

    def engine(self, compiled: bool = False):
        from arc2face_engine.generation.engine import Arc2FaceEngine

        if compiled not in self._engines:
            self._engines[compiled] = Arc2FaceEngine.from_pretrained(
                self.models_dir, device=str(self.device), lcm=True, compile=compiled,
                max_batch_size=self.batch, batch_buckets=[self.batch] if compiled else None,
                compile_backend="eager" if self.args.dry_run else None,
            )  # fmt: skip
        return self._engines[compiled]

    def _torch_analyzer(self, device, dtype):
        from arc2face_engine.faces.torch_analyzer import TorchFaceAnalyzer

        # The skin tone needs scikit-image and insightface on the host; a bare image lacks
        # them, and the table's notes say the analysis ran without it.
        return TorchFaceAnalyzer.from_models_dir(
            self.models_dir, det_size=min(640, self.size), device=device, dtype=dtype,
            batch_size=max(32, self.batch), skin_tone=self.skin_tone,
        )  # fmt: skip

    def requests(self, count: int):
        from arc2face_engine.generation.settings import ImageRequest

        rng = self.np.random.default_rng(count)
        embeddings = rng.standard_normal((count, 512)).astype(self.np.float32)
        return [ImageRequest(embedding, 1000 + i) for i, embedding in enumerate(embeddings)]

    def sync(self) -> None:
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)

    def generate_and_verify(self, count: int, settings, engine=None) -> dict:
        """Warm-up batch (same shapes, 1 step), then `count` images generated and verified
        batch by batch, timed."""
        engine = engine or self.engine()
        requests = self.requests(count)
        engine.generate(requests[: self.batch], self.settings(settings.scheduler == "lcm", 1))
        self.analyzer.verify(self._blank(min(count, self.batch)), self._identities(count)[: self.batch])
        self.sync()
        started = time.perf_counter()
        verified = 0
        generate_seconds = 0.0
        for start in range(0, count, self.batch):
            batch = requests[start : start + self.batch]
            began = time.perf_counter()
            images = engine.generate(batch, settings)
            generate_seconds += time.perf_counter() - began
            embeddings = self.np.stack([request.embedding for request in batch])
            verified += len(self.analyzer.verify(images, embeddings))
        timed = time.perf_counter() - started
        return {"images": verified, "timed_seconds": round(timed, 3),
                "note": f"generate {count / generate_seconds:.2f} img/s; batch {self.batch}"}  # fmt: skip

    def _blank(self, count: int):
        return self.np.zeros((count, self.size, self.size, 3), self.np.uint8)

    def _identities(self, count: int):
        return self.np.stack([request.embedding for request in self.requests(count)])


# --- steps ----------------------------------------------------------------------------------


def step_smoke(bench: Bench) -> dict:
    engine = bench.engine()
    images = engine.generate(bench.requests(2), bench.settings(steps=2))
    assert images.shape == (2, bench.size, bench.size, 3), images.shape
    verdicts = bench.analyzer.verify(images, bench._identities(2))
    return {"images": 2, "note": f"faces found: {sum(v.record.face_count > 0 for v in verdicts)}/2"}


def step_reference(bench: Bench) -> dict:
    """The model card's loop on the engine's modules: one identity per call, 4 images,
    PIL output, then face analysis image by image."""
    from diffusers import StableDiffusionPipeline

    engine = bench.engine()
    base = engine.variants["dpmsolver++"].pipeline
    pipeline = StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=base.scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )  # fmt: skip
    pipeline.set_progress_bar_config(disable=True)
    analyze_one, label = _reference_face_analysis(bench)
    identities = 1 if bench.args.dry_run else 2
    settings = bench.settings()

    def run(count: int, steps: int) -> int:
        images = 0
        for embedding in bench._identities(count):
            for image in pipeline(
                prompt_embeds=engine.encode_identities(embedding[None]),
                num_inference_steps=steps, guidance_scale=settings.guidance_scale,
                num_images_per_prompt=4, height=bench.size, width=bench.size,
            ).images:  # fmt: skip
                analyze_one(bench.np.asarray(image))
                images += 1
        return images

    run(1, 1)  # warm-up
    started = time.perf_counter()
    images = run(identities, settings.num_inference_steps)
    return {"images": images, "timed_seconds": round(time.perf_counter() - started, 3),
            "note": f"face analysis: {label}"}  # fmt: skip


def _reference_face_analysis(bench: Bench) -> tuple[Callable, str]:
    """insightface's FaceAnalysis when onnxruntime and OpenCV are installed, else the
    torch analyzer one image per call."""
    if all(importlib.util.find_spec(name) for name in ("onnxruntime", "cv2", "skimage")):
        from insightface.app import FaceAnalysis

        app = FaceAnalysis(name=str(bench.models_dir / "antelopev2"))
        app.prepare(ctx_id=0, det_size=(min(640, bench.size),) * 2)
        return (lambda image: app.get(image[:, :, ::-1])), "insightface FaceAnalysis"
    return (lambda image: bench.analyzer.analyze([image])), "torch analyzer, one image per call"


def step_eager_64(bench: Bench, lcm: bool) -> dict:
    count = bench.batch * (1 if bench.args.dry_run else 2)
    return bench.generate_and_verify(count, bench.settings(lcm))


def step_face_agreement(bench: Bench) -> dict:
    """fp16 and fp32 on the GPU against the CPU reference, on generated images."""
    torch = bench.torch
    images = bench.engine().generate(bench.requests(8), bench.settings(steps=2))
    reference, label = _cpu_reference(bench)
    want = reference.analyze(list(images))
    notes = []
    for dtype in (torch.float16, torch.float32):
        analyzer = bench._torch_analyzer(bench.device, dtype)
        got = analyzer.analyze(list(images))
        same = sum(g.face_count == w.face_count for g, w in zip(got, want, strict=True))
        boxes = [abs(g.bbox - w.bbox).max() for g, w in zip(got, want, strict=True) if w.face_count and g.face_count]
        worst = max(boxes) if boxes else 0.0
        notes.append(f"{str(dtype)[6:]}: counts {same}/{len(want)}, box max {worst:.2f}px")
    return {"images": len(images), "note": f"vs {label}: " + "; ".join(notes)}


def _cpu_reference(bench: Bench):
    if all(importlib.util.find_spec(name) for name in ("onnxruntime", "cv2", "skimage")):
        from arc2face_engine.faces.onnxruntime_analyzer import FaceAnalyzer

        analyzer = FaceAnalyzer.from_models_dir(
            bench.models_dir, providers=["CPUExecutionProvider"], det_size=min(640, bench.size)
        )
        return analyzer, "onnxruntime CPU"
    return bench._torch_analyzer("cpu", bench.torch.float32), "torch CPU fp32 (no onnxruntime)"


def step_compiled_64(bench: Bench) -> dict:
    engine = bench.engine(compiled=True)
    settings = bench.settings()
    started = time.perf_counter()
    engine.warm_up([bench.batch], settings)  # the one bucket a full batch uses
    warm = time.perf_counter() - started
    result = bench.generate_and_verify(bench.batch * (1 if bench.args.dry_run else 2), settings, engine)
    problems = engine.compile_problems()
    graphs = len(engine.compile_watch.graphs)
    result["note"] += f"; compile {warm:.0f} s, {graphs} graphs; " + ("; ".join(problems) or "no fallback")
    return result


def step_batch(bench: Bench, size: int) -> dict:
    bench.batch = size
    return bench.generate_and_verify(size * 2, bench.settings())


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny models (CI)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu-run")))
    args = parser.parse_args()
    if not args.dry_run:
        install_carried_wheels()
    sys.path.insert(0, str(ROOT))
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on CPU", file=sys.stderr)
        return 2
    device = "cpu (dry run, tiny models)" if args.dry_run else torch.cuda.get_device_name(0)
    meta = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}  # fmt: skip
    report = Report(args.out, meta)
    with tempfile.TemporaryDirectory(prefix="gpu-run-") as workdir:
        started = time.perf_counter()
        bench = Bench(args, Path(workdir))
        report.add({"step": "setup", "status": "ok", "seconds": round(time.perf_counter() - started, 2),
                    "note": "stand-in models written, engine and analyzer loaded"
                    + ("" if bench.skin_tone else "; skin tone off: no scikit-image")})  # fmt: skip
        timed_step(report, "smoke", lambda: step_smoke(bench))
        timed_step(report, "reference (model card)", lambda: step_reference(bench))
        timed_step(report, "eager batch 64 default", lambda: step_eager_64(bench, lcm=False))
        timed_step(report, "eager batch 64 LCM 4 steps", lambda: step_eager_64(bench, lcm=True))
        timed_step(report, "face analysis agreement", lambda: step_face_agreement(bench))
        timed_step(report, "compiled batch 64 default", lambda: step_compiled_64(bench))
        for size in (16, 32):
            if not args.dry_run:
                timed_step(report, f"eager batch {size} default", lambda s=size: step_batch(bench, s))
    failed = [step["step"] for step in report.steps if step["status"] != "ok"]
    print(f"results: {args.out / 'gpu_run.json'}; failed steps: {failed or 'none'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
