"""The `arc2face-synth` command line.

Over 600 lines on purpose. It holds each command's options and help text, plus the
mapping of known errors to one line and an exit status. Each command is a short function
that parses its options and hands over to a flow or to the engine.
"""

from __future__ import annotations

import errno
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from flows import interrupts
from flows.prefect_api import ephemeral_timeout_message, patient_ephemeral_server
from schemas.errors import UserError

# Prefect reads its settings at import time. Its run logs still reach its API (the UI);
# the console shows this CLI's progress and one-line errors instead of Prefect's
# tracebacks. PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL=INFO brings them back.
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
patient_ephemeral_server()
# The model libraries' advisories (optional torchvision, IP-Adapter without an image
# encoder) and weight-loading bars are noise for a CLI user; errors still show.
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

app = typer.Typer(
    name="arc2face-synth",
    help="Synthetic face-recognition datasets with Arc2Face.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
models_app = typer.Typer(help="Fetch, check and fake model directories.", no_args_is_help=True)
banks_app = typer.Typer(help="Build pose and expression banks.", no_args_is_help=True)
app.add_typer(models_app, name="models")
app.add_typer(banks_app, name="banks")
console = Console(soft_wrap=True)  # paths and commands in messages stay copyable

COMPONENTS = ("controlnet", "expression", "lcm", "smirk")


StorageOptions = Annotated[
    str | None,
    typer.Option(
        "--storage-options",
        help='fsspec options as JSON, e.g. \'{"client_kwargs": {"endpoint_url": "http://minio:9000"}}\'',
    ),
]


def _storage_options(text: str | None) -> dict:
    if not text:
        return {}
    try:
        options = json.loads(text)
    except json.JSONDecodeError as error:
        raise UserError(
            f"--storage-options is not valid JSON ({error.msg}): quote it as '{{...}}'"
        ) from None
    if not isinstance(options, dict):
        raise UserError("--storage-options must be a JSON object, e.g. '{\"anon\": true}'")
    return options


def _components(value: str) -> list[str]:
    names = [name.strip() for name in value.split(",") if name.strip()]
    unknown = sorted(set(names) - set(COMPONENTS))
    if unknown:
        raise UserError(
            f"unknown component(s) {', '.join(unknown)}: choose from {', '.join(COMPONENTS)}"
        )
    return names


@models_app.command("download")
def models_download(
    directory: Annotated[Path, typer.Argument(help="Models directory to fill.")] = Path("models"),
    with_: Annotated[str, typer.Option("--with", help="Extras: controlnet,expression,lcm")] = "",
) -> None:
    """Fetch the real weights from the Hugging Face Hub and record their sha256."""
    from arc2face_engine.models_dir import download_models

    root = download_models(directory, _components(with_))
    console.print(f"models ready in {root}")


@models_app.command("verify")
def models_verify(
    directory: Annotated[Path, typer.Argument(help="Models directory to check.")],
    with_: Annotated[str, typer.Option("--with", help="Extras to require too.")] = "",
) -> None:
    """Check every file against checksums.json; exit 1 on any problem."""
    from arc2face_engine.models_dir import verify_models

    problems = verify_models(directory, ("core", *_components(with_)))
    for problem in problems:
        typer.echo(f"problem: {problem}")
    if problems:
        raise typer.Exit(1)
    console.print(f"{directory}: all files present and matching checksums.json")


@models_app.command("tiny")
def models_tiny(
    directory: Annotated[Path, typer.Argument(help="Where to write the tiny models.")],
) -> None:
    """Write a complete models directory with tiny random weights (tests, demo)."""
    from arc2face_engine.testing.tiny_models import write_tiny_models

    console.print(f"tiny models written to {write_tiny_models(directory)}")


@app.command("schema")
def schema(
    out: Annotated[Path | None, typer.Option(help="Write the JSON schema here.")] = None,
) -> None:
    """Print (or write) the JSON schema of job specs."""
    from schemas.job import json_schema, write_json_schema

    if out is None:
        print(json.dumps(json_schema(), indent=2))
    else:
        console.print(f"wrote {write_json_schema(str(out))}")


@app.command("plan")
def plan(
    spec: Annotated[str, typer.Argument(help="Job spec (YAML path or URI).")],
    throughput: Annotated[
        float | None, typer.Option(help="Measured images/s per GPU for these settings.")
    ] = None,
    throughput_table: Annotated[
        str | None,
        typer.Option(help="JSON of measurements (bench/bench_e2e.py --save-throughput)."),
    ] = None,
) -> None:
    """Print counts, shards and an estimated GPU time; loads no model."""
    from arc2face_engine.job.estimate import load_throughput_table, summarize
    from schemas.job import load_spec

    table = load_throughput_table(throughput_table) if throughput_table else None
    summary = summarize(load_spec(spec), throughput, table)
    table = Table("what", "value", title=f"plan for {spec}")
    for key, value in summary.rows():
        table.add_row(key, str(value))
    console.print(table)


@app.command("generate")
def generate(
    spec: Annotated[str, typer.Argument(help="Job spec (YAML path or URI).")],
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    redo_damaged: Annotated[
        bool,
        typer.Option(
            help="Move committed shards whose manifest part fails its checksum aside "
            "(damaged/<time>/ in the output) and generate them again."
        ),
    ] = False,
) -> None:
    """Run the generate flow: identities, generation, verification, dataset."""
    interrupts.describe_with(lambda: _generate_interrupted(spec))
    finished = _check_spec_quickly(spec)
    from flows.generate import generate_dataset  # Prefect and the model libraries: now

    started = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    # A finished dataset is checked by the flow too, and not rewritten.
    info = generate_dataset(spec, show_progress=progress, redo_damaged=redo_damaged)
    if redo_damaged:
        _print_set_aside(spec, started)
    if finished and not redo_damaged:
        console.print(finished)
    else:
        _print_counts(info)


def _print_set_aside(uri: str, started: str) -> None:
    """Where `--redo-damaged` put the damaged shards: damaged/<UTC time>/ of this run."""
    from arc2face_engine.dataset import layout
    from arc2face_engine.dataset.reader import DatasetReader
    from schemas.job import load_spec

    spec = load_spec(uri)
    reader = DatasetReader(spec.output.uri, spec.output.storage_options)
    stamps = []
    if reader.exists(layout.DAMAGED_DIR):
        listed = reader.fs.ls(reader.path(layout.DAMAGED_DIR), detail=False)
        stamps = [name.rstrip("/").rsplit("/", 1)[-1] for name in listed]
    stamps = [stamp for stamp in stamps if stamp >= started]  # set aside by this run
    if not stamps:
        console.print("no damaged shards found: nothing was redone")
        return
    folder = f"{layout.DAMAGED_DIR}/{max(stamps)}"
    parts = reader.fs.glob(reader.path(f"{folder}/{layout.MANIFEST_DIR}/part-*.parquet"))
    shards = sorted(layout.shard_of_part(part) for part in parts)
    console.print(
        f"redone {len(shards)} damaged shards ({', '.join(f'{s:05d}' for s in shards)}); "
        f"their damaged files are kept in {spec.output.uri}/{folder}/"
    )


def _generate_interrupted(uri: str) -> str:
    """`interrupted: N of M shards committed; ...`, counted on the output after the stop."""
    from arc2face_engine.dataset.reader import DatasetReader
    from arc2face_engine.job.estimate import summarize
    from schemas.job import load_spec

    committed, total = 0, None
    try:
        spec = load_spec(uri)
        if not spec.output.storage_options_secret:  # a Secret block needs the (gone) API
            from flows.credentials import with_credentials

            spec = with_credentials(spec)  # ${env:NAME} references in storage options
        reader = DatasetReader(spec.output.uri, spec.output.storage_options)
        if reader.exists("dataset.json"):
            state = reader.completeness()
            committed, total = state.committed, state.total
        if total is None:
            total = summarize(spec).shards
    except Exception:  # a spec or output that cannot be read now: say what is known
        pass
    planned = f"{committed} of {total}" if total is not None else f"{committed}"
    return f"interrupted: {planned} shards committed; re-run the same command to resume"


def _check_spec_quickly(uri: str) -> str | None:
    """Parse and validate the spec and make the checks that load no model library, before
    Prefect, torch or diffusers are imported: a mistake is one line within a second.
    Returns what to say when the output already holds the finished dataset (the flow
    still makes the other checks, and then rewrites nothing)."""
    from schemas.job import load_spec

    spec = load_spec(uri)
    if spec.output.storage_options_secret:  # a Secret block needs the Prefect API first
        return None
    from arc2face_engine.job.lifecycle import nothing_to_do
    from arc2face_engine.job.preflight import quick_checks
    from flows.credentials import with_credentials

    spec = with_credentials(spec)
    return nothing_to_do(spec, quick_checks(spec))


def _print_counts(info) -> None:
    counts = info.counts
    console.print(
        f"{info.name}: {info.status}; {counts.identities} identities, "
        f"{counts.committed_shards}/{counts.shards} shards, {counts.images} images, "
        f"{counts.accepted} accepted, {counts.rejected} rejected"
    )


@app.command("demo")
def demo(
    out: Annotated[Path, typer.Argument(help="Folder for the tiny models and dataset.")] = Path(
        "demo-dataset"
    ),
    identities: Annotated[int, typer.Option(help="How many identities.")] = 8,
) -> None:
    """The main job on built-in tiny models: generate -> filter -> write -> audit."""
    from flows.demo import run_demo

    interrupts.describe_with(
        lambda: f"interrupted: the demo in {out} stopped; re-run the same command to resume"
    )
    report = run_demo(out, identities=identities, show_progress=True)
    if not report.passed:
        raise typer.Exit(1)


def _progress_bar(show: bool):
    """A rich progress bar fed by the engine's `ProgressReport` callbacks (one row per stage);
    off when stdout is not a terminal, so logs and pipes get no bar frames."""
    from contextlib import contextmanager

    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    @contextmanager
    def bar():
        progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not show or not console.is_terminal,
        )  # fmt: skip
        tasks: dict[str, int] = {}

        def report(stage: str, completed: int, total: int) -> None:
            if stage not in tasks:
                tasks[stage] = progress.add_task(stage, total=total)
            progress.update(tasks[stage], completed=completed, total=total)

        with progress:
            yield report

    return bar()


@app.command("audit")
def audit(
    uri: Annotated[str, typer.Argument(help="Dataset folder or URI.")],
    gallery: Annotated[
        str | None,
        typer.Option(help="Parquet/.npy of real-person embeddings or a dataset folder; default: the spec's exclusion gallery."),
    ] = None,
    gallery_threshold: Annotated[
        float | None,
        typer.Option(help="Leak flag above this cosine; default: the spec's exclusion max_cosine, else 0.5."),
    ] = None,
    reverify: Annotated[int, typer.Option(help="Re-run face analysis on N images.")] = 0,
    models: Annotated[
        Path | None,
        typer.Option(help="Models dir for --reverify; default: the models.dir dataset.json records."),
    ] = None,
    radius: Annotated[float, typer.Option(help="Cosine-distance radius for quality.")] = 0.3,
    fairness_gap: Annotated[
        float,
        typer.Option(help="Warn when a metric differs by more than this between groups."),
    ] = 0.1,
    prefect: Annotated[bool, typer.Option(help="Run as a Prefect flow (artifacts).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    storage_options: StorageOptions = None,
) -> None:
    """Audit a dataset: schema, integrity, quality, leakage, composition. Exit 1 when
    integrity fails."""
    interrupts.describe_with(
        lambda: f"interrupted: the audit of {uri} stopped before writing its report; "
        "re-run the same command"
    )
    if not (math.isfinite(fairness_gap) and fairness_gap >= 0):
        raise UserError(f"--fairness-gap {fairness_gap:g} is not a gap >= 0: pass e.g. 0.1")
    options = dict(
        gallery=gallery,
        gallery_threshold=gallery_threshold,
        reverify=reverify,
        models_dir=str(models) if models else None,
        radius=radius,
        fairness_gap=fairness_gap,
    )
    if prefect:
        from flows.audit import audit_dataset_flow
        from flows.prefect_api import check_api

        check_api()
        models_dir = options.pop("models_dir")  # the flow takes the CLI's names
        report = audit_dataset_flow(
            uri, _storage_options(storage_options), models=models_dir, **options
        )
    else:
        from arc2face_engine.audit import audit_dataset

        with _progress_bar(progress) as bar:
            report = audit_dataset(uri, _storage_options(storage_options), **options, progress=bar)
    _print_audit(report)
    if not report.passed:
        raise typer.Exit(1)


def _print_audit(report) -> None:
    verdict = "[green]PASSED[/green]" if report.passed else "[red]FAILED[/red]"
    if report.in_progress:
        verdict += f" [yellow](dataset in progress: {report.in_progress_reason})[/yellow]"
    console.print(f"audit {verdict}: {report.report_uri}; {escape(report.headline())}")
    if report.reverify is not None:
        console.print(
            f"re-verified {report.reverify.checked} images with the models in "
            f"{report.reverify.models_dir} ({report.reverify.models_from})"
        )
    for problem in report.problems[:20]:
        console.print(f"  - {problem}")


@app.command("compare")
def compare(
    uris: Annotated[list[str], typer.Argument(help="Two or more dataset folders or URIs.")],
    out: Annotated[str, typer.Option(help="Folder for compare.json and compare.html.")],
    radius: Annotated[
        float, typer.Option(help="Cosine-distance radius: identities closer than this overlap.")
    ] = 0.3,
    verify_files: Annotated[
        bool, typer.Option(help="Also hash and decode every image, as audit does.")
    ] = False,
    device: Annotated[
        str, typer.Option(help="Where the overlap search runs: cpu, cuda, auto.")
    ] = "cpu",
    prefect: Annotated[bool, typer.Option(help="Run as a Prefect flow (artifacts).")] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    storage_options: StorageOptions = None,
) -> None:
    """Compare datasets side by side: audit metrics, overlaid plots, shared identities."""
    options = _storage_options(storage_options)
    if prefect:
        from flows.audit import compare_datasets_flow
        from flows.prefect_api import check_api

        check_api()
        report = compare_datasets_flow(list(uris), out, options, radius, verify_files, device=device)
    else:
        from arc2face_engine.audit.compare import compare_datasets

        with _progress_bar(progress) as bar:
            report = compare_datasets(
                list(uris), out, options, radius, verify_files=verify_files, device=device,
                progress=bar,
            )
    table = Table("dataset", "passed", "identities", "accepted", "uniqueness", "intra-class",
                  "inter-class max", title="compare")  # fmt: skip
    for row in report.summary_rows():
        table.add_row(*(str(value if not isinstance(value, float) else round(value, 4))
                        for value in row.values()))  # fmt: skip
    console.print(table)
    for found in report.overlaps:
        console.print(
            f"datasets {found.first + 1} ~ {found.second + 1}: {found.pair_count} identity pairs "
            f"within cosine {found.threshold:.2f} (max {found.max_cosine})"
        )
    console.print(f"report: {report.html_uri}")


@app.command("export")
def export(
    uri: Annotated[str, typer.Argument(help="Dataset folder or URI.")],
    format_: Annotated[
        str, typer.Option("--format", help="recordio | imagefolder | webdataset | hf")
    ],
    out: Annotated[str, typer.Option(help="Output folder or URI (new or empty).")],
    align: Annotated[
        bool, typer.Option(help="Align faces to 112x112 from keypoints (--no-align keeps the size).")
    ] = True,
    include_rejected: Annotated[bool, typer.Option(help="Export rejected images too.")] = False,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out.")] = False,
    labels: Annotated[
        str,
        typer.Option(help="contiguous: 0..K-1 over identities with an image; dataset: keep identities.parquet's labels."),
    ] = "contiguous",
    dali: Annotated[
        bool, typer.Option(help="recordio: images only, shuffled, keys 0..N-1 (shuffle_rec.py's layout, for DALI).")
    ] = False,
    shuffle_seed: Annotated[int, typer.Option(help="recordio --dali: seed of the order.")] = 0,
    allow_incomplete: Annotated[
        bool, typer.Option(help="Export a dataset whose generation has not finished.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    storage_options: StorageOptions = None,
) -> None:
    """Export accepted images for face-recognition training (label_map.csv maps labels to ids)."""
    from arc2face_engine.exports import ExportError, export_dataset

    interrupts.describe_with(lambda: _export_interrupted(out))
    options = _storage_options(storage_options)
    extra = {}
    if dali or shuffle_seed:
        if format_.lower() not in ("recordio", "rec"):
            raise ExportError("--dali and --shuffle-seed are recordio options: use --format recordio")
        extra = {"dali": dali, "shuffle_seed": shuffle_seed}
    with _progress_bar(progress) as bar:
        result = export_dataset(
            uri,
            out,
            format_,
            storage_options=options,
            align=align,
            include_rejected=include_rejected,
            out_storage_options=options,
            overwrite=overwrite,
            labels=labels,
            progress=bar,
            allow_incomplete=allow_incomplete,
            **extra,
        )
    console.print(f"exported {result}")


def _export_interrupted(out: str) -> str:
    if "://" in out and not out.startswith("file://"):
        left = f"files written so far under {out} are incomplete: re-run with --overwrite"
    else:
        left = f"{out} was not written (an existing one is unchanged): re-run the same command"
    return f"interrupted: the export stopped before it finished; {left}"


@app.command("import")
def import_(
    source: Annotated[str, typer.Argument(help="The dataset to import: folder, file or URI.")],
    format_: Annotated[
        str, typer.Option("--format", help="recordio | imagefolder | webdataset | hf")
    ],
    out: Annotated[str, typer.Option(help="The dataset to write (new, or an import to resume).")],
    models: Annotated[Path, typer.Option(help="Models directory holding antelopev2/.")],
    aligned: Annotated[
        bool | None,
        typer.Option(
            "--aligned/--no-aligned",
            help="Images are aligned 112x112 crops: embed without detection (default: recordio only).",
        ),
    ] = None,
    name: Annotated[str | None, typer.Option(help="Dataset name (default: from SOURCE).")] = None,
    label_field: Annotated[
        str | None,
        typer.Option(help="webdataset: cls or json.FIELD; hf: the label column (default label)."),
    ] = None,
    image_field: Annotated[str, typer.Option(help="hf: the image column.")] = "image",
    shard_size: Annotated[int, typer.Option(help="Images per shard (whole identities).")] = 1000,
    max_images: Annotated[
        int, typer.Option(help="Refuse a source holding more items than this.")
    ] = 10_000_000,
    min_det_score: Annotated[float, typer.Option(help="Reject weaker detections.")] = 0.5,
    min_feature_norm: Annotated[
        float, typer.Option(help="Reject faces with a lower ArcFace feature norm (0: off).")
    ] = 0.0,
    device: Annotated[str, typer.Option(help="Face analysis device: cpu, cuda, auto.")] = "cpu",
    workers: Annotated[int, typer.Option(help="Shards analysed at the same time.")] = 1,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
    storage_options: StorageOptions = None,
    out_storage_options: Annotated[
        str | None,
        typer.Option(help="fsspec options of --out as JSON (default: --storage-options)."),
    ] = None,
) -> None:
    """Import a face dataset (RecordIO, ImageFolder, WebDataset, HF Parquet) into this
    project's format: every image copied and analysed; auditable and comparable after."""
    from schemas.imports import parse_import_spec

    source_options = _storage_options(storage_options)
    spec = parse_import_spec(
        dict(
            source=source, format=format_, out=out, models_dir=str(models), aligned=aligned,
            name=name, label_field=label_field, image_field=image_field, shard_size=shard_size,
            max_images=max_images, min_det_score=min_det_score,
            min_feature_norm=min_feature_norm, device=device, workers=workers,
            storage_options=source_options,
            out_storage_options=_storage_options(out_storage_options) if out_storage_options
            else source_options,
        )
    )  # fmt: skip
    from arc2face_engine.ingest.lifecycle import quick_checks

    quick_checks(spec)  # one line within a second, before Prefect starts
    from flows.imports import import_dataset

    info = import_dataset(spec, show_progress=progress)
    _print_counts(info)
    source_info = info.imported
    console.print(
        f"  {source_info.source_items} source items, {source_info.identities_left_out} "
        f"identities left out (no accepted image), {source_info.unlabelled} without a label"
    )


@banks_app.command("poses")
def banks_poses(
    out: Annotated[str, typer.Argument(help="Folder for the pose bank (images + poses.parquet).")],
    mesh: Annotated[str | None, typer.Option(help="OBJ/PLY head mesh; default procedural.")] = None,
    yaw: Annotated[str, typer.Option(help="Comma-separated yaw angles (degrees).")] = "0",
    pitch: Annotated[str, typer.Option(help="Comma-separated pitch angles.")] = "0",
    roll: Annotated[str, typer.Option(help="Comma-separated roll angles.")] = "0",
    size: Annotated[int, typer.Option(help="Normal-map size in pixels.")] = 512,
) -> None:
    """Render normal maps over a yaw x pitch x roll grid into a folder bank."""
    from arc2face_engine.controls.poses import PoseBank

    grid = [_angles(yaw, "yaw"), _angles(pitch, "pitch"), _angles(roll, "roll")]
    bank = (
        PoseBank.from_mesh(mesh, *grid, size=size)
        if mesh
        else PoseBank.procedural(*grid, size=size)
    )
    bank.save(out)
    console.print(f"{len(bank)} poses written to {out}")


def _angles(text: str, name: str) -> list[float]:
    try:
        return [float(value) for value in text.split(",") if value.strip()]
    except ValueError:
        raise UserError(f"--{name} must be comma-separated numbers, got {text!r}") from None


@banks_app.command("expressions")
def banks_expressions(
    out: Annotated[str, typer.Argument(help="Parquet file for the expression bank.")],
    count: Annotated[int, typer.Option(help="Random expressions to draw.")] = 16,
    seed: Annotated[int, typer.Option(help="Seed of the random prior.")] = 0,
    spread: Annotated[float, typer.Option(help="Multiplier of the prior's std.")] = 1.0,
    smirk_images: Annotated[
        str | None, typer.Option(help="Folder of reference photos for SMIRK extraction.")
    ] = None,
    models: Annotated[Path, typer.Option(help="Models dir holding smirk/.")] = Path("models"),
) -> None:
    """Write an expression bank: a seeded random prior, or SMIRK on reference photos."""
    from arc2face_engine.controls.expressions import ExpressionBank, extract_with_smirk

    if smirk_images:
        bank = extract_with_smirk(smirk_images, models)
    else:
        bank = ExpressionBank.random(count, seed=seed, spread=spread)
    bank.save(out)
    console.print(f"{len(bank.expressions)} expressions written to {out}")


def _one_line(error: BaseException) -> tuple[str, int] | None:
    """(message, exit status) for errors a user can act on; None for bugs (traceback)."""
    if isinstance(error, UserError):
        return str(error), 2
    from flows.generate import ShardsFailed  # imports Prefect: only when it can matter

    if isinstance(error, ShardsFailed):
        return str(error), 1
    slow_server = ephemeral_timeout_message(error)
    if slow_server:
        return slow_server, 2
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)):
        return f"{error}: check the path and its permissions", 2
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
        return f"{error}: free space or use a writable location, then re-run", 2
    if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        return (
            f"{error}: give credentials in output.storage_options (generate) or "
            "--storage-options (audit, export), or the usual AWS_* environment variables",
            2,
        )
    return None


def main() -> None:
    """Console-script entry point: an error a user can fix is one line on stderr, with
    exit status 2 for bad input (1 for failed shards); anything else is a bug and keeps
    its traceback."""
    with interrupts.handling():  # Ctrl-C / SIGTERM: one line, nothing partial, no orphans
        try:
            app()
        except Exception as error:
            known = _one_line(error)
            if known is None:
                raise
            message, status = known
            print(f"error: {message}".replace("\n", " "), file=sys.stderr)
            sys.exit(status)


if __name__ == "__main__":
    main()
