"""Orchestration overhead: the Prefect flow vs the same work called directly.

Both sides run the same job spec on the same tiny models in the same process:
`run_job_directly` loops over the shards with plain function calls; the flow
fans the same shards out as Prefect tasks and adds the progress bar and the
summary artifact. Models are loaded once before timing (a worker keeps them for
its lifetime) and the Prefect server is started once, as a deployment has it.

    python bench/bench_flow.py [--identities 24] [--images 8] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")


def bench_spec(models: Path, out: Path, identities: int, images: int, shard_size: int):
    from schemas.job import JobSpec

    return JobSpec.model_validate(
        {
            "name": "bench",
            "seed": 1,
            "models": {"dir": str(models), "device": "cpu", "precision": "fp32"},
            "identities": {"source": "random", "count": identities, "separation": 0.3},
            "variations": {
                "images_per_identity": images,
                "poses": {"kind": "procedural", "yaw": [-20, 0, 20]},
                "expressions": {"kind": "random", "count": 2},
            },
            "generation": {"steps": 4, "batch_size": 16, "height": 64, "width": 64},
            "filter": {"min_similarity": 0.0, "max_attempts": 2},
            "output": {"uri": str(out), "shard_size": shard_size},
            "compute": {"task_runner": "local", "devices": ["cpu"]},
        }
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=24)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--shard-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from prefect import flow

    from arc2face_engine.dataset.reader import DatasetReader
    from arc2face_engine.job.direct import run_job_directly
    from arc2face_engine.job.workers import worker_for
    from arc2face_engine.testing.tiny_models import write_tiny_models
    from flows.generate import generate_dataset

    tmp = Path(tempfile.mkdtemp(prefix="bench-flow-"))
    models = write_tiny_models(tmp / "models")

    def spec_for(name: str):
        return bench_spec(models, tmp / name, args.identities, args.images, args.shard_size)

    @flow
    def warm_up() -> None:
        return None

    warm_up()  # start the Prefect server once, outside the timings
    worker_for(spec_for("warm"))  # load the models once, as a long-lived worker does

    direct, orchestrated = [], []
    for repeat in range(args.repeats):
        started = time.perf_counter()
        info = run_job_directly(spec_for(f"direct-{repeat}"))
        direct.append(time.perf_counter() - started)
        started = time.perf_counter()
        generate_dataset(spec_for(f"flow-{repeat}"))
        orchestrated.append(time.perf_counter() - started)
    same = (
        DatasetReader(str(tmp / "direct-0"))
        .manifest()
        .equals(DatasetReader(str(tmp / "flow-0")).manifest())
    )
    images = info.counts.images
    shards = info.counts.shards
    direct_s, flow_s = statistics.median(direct), statistics.median(orchestrated)
    print(
        f"\n{args.identities} identities x {args.images} images, {shards} shards, "
        f"{images} images generated per run (tiny models, CPU), {args.repeats} repeats"
    )
    print(f"{'path':<22}{'median s':>10}{'min s':>10}{'max s':>10}{'images/s':>10}")
    for name, times in (("engine called directly", direct), ("Prefect flow", orchestrated)):
        print(
            f"{name:<22}{statistics.median(times):>10.2f}{min(times):>10.2f}"
            f"{max(times):>10.2f}{images / statistics.median(times):>10.1f}"
        )
    print(f"flow / direct = {flow_s / direct_s:.3f} (target <= 1.10); identical manifests: {same}")


if __name__ == "__main__":
    main()
