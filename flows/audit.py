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
    models_dir: str | None = None,
    radius: float = 0.3,
    storage_options_secret: str | None = None,
):
    """Audit the dataset at `uri` (schema, integrity, quality, leakage against `gallery`,
    re-verification of `reverify` images with `models_dir`); report.json/html land in
    its audit/ folder."""
    options: dict[str, Any] = dict(reverify=reverify, models_dir=models_dir, radius=radius)
    if gallery is not None:
        options["gallery"] = gallery
    if gallery_threshold is not None:  # else the audit's own default
        options["gallery_threshold"] = gallery_threshold
    resolved = resolve_storage_options(storage_options, storage_options_secret)
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
    out_uri: str,
    fmt: Literal["recordio", "imagefolder", "webdataset", "hf"] = "recordio",
    align: bool = True,
    include_rejected: bool = False,
    overwrite: bool = False,
    labels: Literal["contiguous", "dataset"] = "contiguous",
    dali: bool = False,
    storage_options: dict[str, Any] | None = None,
    storage_options_secret: str | None = None,
    out_storage_options: dict[str, Any] | None = None,
):
    """Export the accepted images of the dataset at `uri` to `out_uri` as `fmt`, aligned
    to 112x112 unless `align` is false; `overwrite` replaces a non-empty `out_uri`;
    `dali` (recordio): images only, keys 0..N-1. Output storage options default to the
    input's."""
    resolved = resolve_storage_options(storage_options, storage_options_secret)
    out = resolve_storage_options(out_storage_options, None, "out_storage_options")
    extra = {"dali": True} if dali else {}
    return export(
        uri,
        out_uri,
        fmt,
        resolved,
        align=align,
        include_rejected=include_rejected,
        out_storage_options=out or resolved,
        overwrite=overwrite,
        labels=labels,
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
