"""The audit, compare and export flows: an independent check of a dataset (or of several,
side by side), published as Prefect artifacts, and training-format exports.

Every parameter is typed, so a deployment's run form in the Prefect UI lists them and
`prefect deployment run audit-dataset/audit --param uri=s3://...` needs nothing else.
Credentials: `storage_options` values may be '${env:NAME}' references and
`storage_options_secret` names a Prefect Secret block (flows/credentials.py).
"""

from __future__ import annotations

from typing import Any, Literal

from prefect.artifacts import create_markdown_artifact, create_table_artifact

from flows import interrupts
from flows.credentials import resolve_storage_options
from flows.redacting import RedactingFlow
from tasks.audit import audit, compare, export


def _flatten(prefix: str, value, rows: list[dict]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, rows)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        rows.append({"check": prefix, "value": value})


def _audit_dataset(
    uri: str,
    storage_options: dict[str, Any] | None = None,
    gallery: str | None = None,
    gallery_threshold: float | None = None,
    reverify: int = 0,
    models: str | None = None,
    radius: float = 0.3,
    storage_options_secret: str | None = None,
    fairness_gap: float = 0.1,
):
    """Audit the dataset at `uri` (schema, integrity, quality, leakage against `gallery`,
    re-verification of `reverify` images with the face models in `models`, by default the
    models.dir dataset.json records); report.json/html land in its audit/ folder. The
    parameters are the CLI's (`arc2face-synth audit URI --models DIR ...`)."""
    options: dict[str, Any] = dict(
        reverify=reverify, models_dir=models, radius=radius, fairness_gap=fairness_gap
    )
    if gallery is not None:
        options["gallery"] = gallery
    if gallery_threshold is not None:  # else the audit's own default
        options["gallery_threshold"] = gallery_threshold
    resolved = resolve_storage_options(storage_options, storage_options_secret)
    with interrupts.kept_inside_flows():  # the CLI's Ctrl-C/SIGTERM handling, not Prefect's
        report = audit(uri, resolved, **options)
    summary = report.summary() if hasattr(report, "summary") else report.model_dump()
    rows: list[dict] = []
    _flatten("", summary, rows)
    create_table_artifact(key="audit-summary", table=rows, description=f"Audit of {uri}")
    verdict = "PASSED" if report.passed else "FAILED"
    problems = "\n".join(f"- {problem}" for problem in report.problems[:50]) or "- none"
    create_markdown_artifact(
        key="audit-verdict",
        markdown=f"# Audit {verdict}\n\nDataset: `{uri}`\n\nProblems:\n{problems}\n",
    )
    return report


audit_dataset_flow = RedactingFlow(_audit_dataset, name="audit-dataset", log_prints=True)


def _export_dataset(
    uri: str,
    out: str,
    format: Literal["recordio", "imagefolder", "webdataset", "hf"] = "recordio",  # the CLI's name
    align: bool = True,
    include_rejected: bool = False,
    overwrite: bool = False,
    labels: Literal["contiguous", "dataset"] = "contiguous",
    dali: bool = False,
    shuffle_seed: int = 0,
    storage_options: dict[str, Any] | None = None,
    storage_options_secret: str | None = None,
    out_storage_options: dict[str, Any] | None = None,
    allow_incomplete: bool = False,
):
    """Export the accepted images of the dataset at `uri` to `out` as `format`, aligned
    to 112x112 unless `align` is false; `overwrite` replaces a non-empty `out`;
    `dali` (recordio): images only, shuffled with `shuffle_seed`, keys 0..N-1;
    `allow_incomplete` exports a dataset still being generated. The parameters are the
    CLI's (`arc2face-synth export URI --out OUT --format FORMAT`). Output storage options
    default to the input's."""
    resolved = resolve_storage_options(storage_options, storage_options_secret)
    out_options = resolve_storage_options(out_storage_options, None, "out_storage_options")
    extra = {"dali": dali, "shuffle_seed": shuffle_seed} if dali or shuffle_seed else {}
    return export(
        uri,
        out,
        format,
        resolved,
        align=align,
        include_rejected=include_rejected,
        out_storage_options=out_options or resolved,
        overwrite=overwrite,
        labels=labels,
        allow_incomplete=allow_incomplete,
        **extra,
    )


export_dataset_flow = RedactingFlow(_export_dataset, name="export-dataset", log_prints=True)


def _compare_datasets(
    uris: list[str],
    out: str,
    storage_options: dict[str, Any] | None = None,
    radius: float = 0.3,
    verify_files: bool = False,
    storage_options_secret: str | None = None,
    out_storage_options: dict[str, Any] | None = None,
    device: str = "cpu",
):
    """Audit the datasets at `uris` side by side and find the identities each pair shares
    (centres within `radius`); compare.json and compare.html land in `out`."""
    resolved = resolve_storage_options(storage_options, storage_options_secret)
    out_options = resolve_storage_options(out_storage_options, None, "out_storage_options")
    report = compare(
        uris, out, resolved, radius=radius, verify_files=verify_files,
        out_storage_options=out_options or resolved, device=device,
    )  # fmt: skip
    create_table_artifact(
        key="compare-summary", table=report.summary_rows(), description=f"Compared in {out}"
    )
    overlaps = "\n".join(
        f"- datasets {found.first + 1} and {found.second + 1}: {found.pair_count} identity pairs "
        f"within cosine {found.threshold:.2f}"
        for found in report.overlaps
    )
    create_markdown_artifact(key="compare-overlap", markdown=f"# Identity overlap\n\n{overlaps}\n")
    return report


compare_datasets_flow = RedactingFlow(_compare_datasets, name="compare-datasets", log_prints=True)
