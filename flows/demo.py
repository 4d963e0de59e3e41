"""The demo: the main job end to end on built-in tiny models."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape

from schemas.job import JobSpec

console = Console(soft_wrap=True)


def demo_spec(out: Path, identities: int = 8) -> JobSpec:
    """A small pose x expression grid on tiny 64x64 models.

    The tiny models are random, so similarity carries no identity signal (it
    scatters around -0.03): the demo's threshold of -0.03 only exercises the
    filter, so that some faces pass and some fail; real jobs keep the default 0.4.
    """
    return JobSpec.model_validate(
        {
            "name": "arc2face-synth demo (tiny random models)",
            "seed": 0,
            "models": {"dir": str(out / "models"), "device": "cpu", "precision": "fp32"},
            "identities": {"source": "random", "count": identities, "separation": 0.3},
            "variations": {
                "images_per_identity": 6,
                "poses": {"kind": "procedural", "yaw": [-30, 0, 30], "pitch": [0], "roll": [0]},
                "expressions": {"kind": "random", "count": 2, "spread": 1.0},
            },
            "generation": {
                "scheduler": "dpmsolver++",
                "steps": 4,
                "guidance": 3.0,
                "batch_size": 12,
                "height": 64,
                "width": 64,
            },
            "filter": {
                "min_similarity": -0.03,
                "min_det_score": 0.5,
                "require_single_face": True,
                "max_attempts": 2,
            },
            "output": {"uri": str(out / "dataset"), "image_format": "jpeg", "shard_size": 12},
            "compute": {"task_runner": "local", "devices": ["cpu"]},
        }
    )


def run_demo(out: Path, identities: int = 8, show_progress: bool = True):
    """Write tiny models, generate the dataset, audit it, export RecordIO."""
    from arc2face_engine.models_dir import verify_models
    from arc2face_engine.testing.tiny_models import write_tiny_models
    from flows.audit import audit_dataset_flow, export_dataset_flow
    from flows.generate import generate_dataset

    out = Path(out).resolve()
    models = out / "models"
    if verify_models(models):
        write_tiny_models(models)
    spec = demo_spec(out, identities)
    info = generate_dataset(spec, show_progress=show_progress)
    counts = info.counts
    console.print(
        f"dataset {spec.output.uri}: {counts.images} images, {counts.accepted} accepted, "
        f"{counts.rejected} rejected {dict(sorted(counts.reject_reasons.items()))}"
    )
    report = audit_dataset_flow(spec.output.uri, models=str(models), reverify=4)
    verdict = "PASSED" if report.passed else "FAILED"
    console.print(f"audit {verdict}: {report.report_uri}; {escape(report.headline())}")
    exported = export_dataset_flow(  # the demo owns its folder: a re-run replaces the export
        spec.output.uri, str(out / "export-recordio"), "recordio", overwrite=True
    )
    console.print(f"RecordIO export: {exported}")
    return report
