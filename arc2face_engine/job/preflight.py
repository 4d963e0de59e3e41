"""Everything a user can get wrong about a job, checked before anything is written, in two
tiers.

`quick_checks` costs well under a second and loads no model library: the paths the spec
names exist (`spec_paths`), the model files it uses are there, and the output is a
writable folder that no live run holds and that holds no dataset of another spec. The CLI runs it
before Prefect starts, and the flow runs it first, so a mistake is one line either way.

`preflight` is the rest, run once, in the flow: every model file opens, every config
fits what it configures (the schedulers build, each diffusers model's config matches its
weights' shapes), the devices exist and verification would run on them, the banks load,
a resumed dataset was made with the same models and precision and every part it
committed matches its checksum, and the identities are built (photos without a face,
unusable files and the exclusion gallery fail here). It returns the identities it built,
for the identities step to write.

Each failure is a UserError naming the problem and the fix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from arc2face_engine import models_dir
from arc2face_engine.controls.expressions import load_expression_bank
from arc2face_engine.controls.poses import load_pose_bank
from arc2face_engine.dataset.lease import check_free
from arc2face_engine.dataset.reader import DatasetReader
from arc2face_engine.job import output_checks
from arc2face_engine.job.balancing import balanced_identities
from arc2face_engine.job.identities_step import (
    BuiltIdentities,
    check_identity_galleries,
    identities_need_engine,
    make_identities,
)
from arc2face_engine.job.lifecycle import open_writer, required_components
from arc2face_engine.job.spec_paths import check_spec_paths
from schemas.errors import SpecError
from schemas.job import JobSpec, spec_hash
from schemas.tables import DatasetInfo

if TYPE_CHECKING:
    import torch


def quick_checks(spec: JobSpec) -> DatasetInfo | None:
    """The checks that need no model library: files present, output usable. Returns the
    output's dataset.json (None for a new dataset)."""
    check_spec_paths(spec)
    for component in required_components(spec):
        models_dir.require(spec.models.dir, component)
    writer = open_writer(spec)
    output_checks.check_output_location(writer)
    check_free(writer.fs, writer.root, writer.uri)
    return writer.check_compatible(spec_hash(spec), spec)


def preflight(spec: JobSpec, redo_damaged: bool = False) -> BuiltIdentities | None:
    """All checks (`quick_checks` first); returns the identities built for a new dataset,
    or None when a resumed dataset keeps its recorded ones or the source needs the
    diffusion models (the identities step builds those). A resumed dataset with a damaged
    committed part is refused unless `redo_damaged` (the flow then sets those aside)."""
    from arc2face_engine.generation.config_checks import check_model_configs
    from arc2face_engine.generation.devices import resolve_device

    quick_checks(spec)
    components = required_components(spec)
    models_dir.check_model_files(spec.models.dir, components)
    check_model_configs(
        spec.models.dir,
        components,
        lcm=spec.generation.scheduler == "lcm",
        steps=spec.generation.steps,
    )
    for device in spec.compute.devices:
        check_face_analysis_device(spec, resolve_device(device))
    precision = output_checks.resolved_precision(spec)
    load_pose_bank(spec.variations.poses, size=spec.generation.height)
    load_expression_bank(spec.variations.expressions, seed=spec.seed, models_dir=spec.models.dir)
    writer = open_writer(spec)
    info = writer.check_compatible(spec_hash(spec), spec)
    if info is not None:
        output_checks.check_resume(spec, info, components, precision)
        if not redo_damaged:
            output_checks.check_committed_parts(writer)
    if DatasetReader(spec.output.uri, spec.output.storage_options).has_identities():
        # A resumed job keeps the identities it recorded, if they are intact (the job
        # reads them again under the lease).
        output_checks.read_recorded_identities(writer, info)
        return None
    if spec.identities.balance is not None:
        return balanced_identities(spec)  # probes: an unfillable quota is refused here
    if identities_need_engine(spec):
        check_identity_galleries(spec)  # the rest is built by the job, with the engine
        return None
    return make_identities(spec)


def check_face_analysis_device(spec: JobSpec, device: torch.device) -> None:
    """Refuse a GPU job whose face analysis would run on the CPU, unless the spec allows it:
    verification would then cap the whole job at a few images/s."""
    from arc2face_engine.faces.loading import face_analysis_placement, unsupported_ops

    if device.type != "cuda" or spec.compute.allow_cpu_face_analysis:
        return
    runtime, where = face_analysis_placement(spec.models.dir, str(device))
    if where == "cpu":
        missing = "; ".join(
            f"{name}: {', '.join(ops)}" for name, ops in unsupported_ops(spec.models.dir).items()
        )
        raise SpecError(
            f"generation runs on {device} but face analysis would run on the CPU ({runtime}; "
            f"the GPU runner lacks ONNX ops {missing}) and cap the job at a few images/s: "
            f"install onnxruntime-gpu in place of onnxruntime, or set "
            f"compute.allow_cpu_face_analysis: true"
        )
