"""The audit flow: an independent check of a dataset, published as Prefect artifacts."""

from __future__ import annotations

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.audit import audit, export


def _flatten(prefix: str, value, rows: list[dict]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            _flatten(f"{prefix}.{key}" if prefix else key, inner, rows)
    elif isinstance(value, (int, float, str, bool)) or value is None:
        rows.append({"check": prefix, "value": value})


@flow(name="audit-dataset", log_prints=True)
def audit_dataset_flow(uri: str, storage_options: dict | None = None, **options):
    """Audit the dataset at `uri`; report.json/html land in its audit/ folder."""
    report = audit(uri, storage_options, **options)
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


@flow(name="export-dataset", log_prints=True)
def export_dataset_flow(
    uri: str, out_uri: str, fmt: str, storage_options: dict | None = None, **options
):
    return export(uri, out_uri, fmt, storage_options, **options)
