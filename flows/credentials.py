"""Storage credentials at run time, never in a spec, a flow-run parameter or dataset.json.

A spec names where credentials come from; the worker that runs the flow resolves them:
- a string value `${env:NAME}` anywhere in `output.storage_options` is replaced by the
  environment variable NAME of the process running the flow;
- `output.storage_options_secret: BLOCK` merges the JSON object stored in the Prefect
  Secret block BLOCK over `output.storage_options`;
- anything else is fsspec's own lookup (AWS_* variables, `profile`, instance roles).
dataset.json records the storage option keys with redacted values (schemas.job.recorded_spec)
and flows store their `spec` parameter the same way (flows/redacting.py).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

from schemas.errors import UserError
from schemas.imports import ImportSpec, recorded_import_spec
from schemas.job import JobSpec, recorded_spec

ENV_REFERENCE = re.compile(r"^\$\{env:([A-Za-z_][A-Za-z0-9_]*)\}$")


def expand_env(value: Any, where: str, env: Mapping[str, str] | None = None) -> Any:
    """`value` with every '${env:NAME}' string replaced by NAME's value."""
    env = os.environ if env is None else env
    if isinstance(value, dict):
        return {key: expand_env(inner, f"{where}.{key}", env) for key, inner in value.items()}
    if isinstance(value, list):
        return [expand_env(inner, f"{where}[{i}]", env) for i, inner in enumerate(value)]
    match = ENV_REFERENCE.match(value) if isinstance(value, str) else None
    if match is None:
        return value
    name = match.group(1)
    if name not in env:
        raise UserError(
            f"{where} refers to environment variable {name}, which is not set where the flow "
            f"runs: set {name} for the worker (or in its work pool's env)"
        )
    return env[name]


def secret_options(block: str) -> dict[str, Any]:
    """The storage options stored in the Prefect Secret block `block`."""
    from prefect.blocks.system import Secret

    try:
        value = Secret.load(block).get()
    except ValueError as error:
        raise UserError(
            f"Prefect Secret block {block!r} (output.storage_options_secret) cannot be read "
            f"({str(error).splitlines()[0]}): create it, e.g. Secret(value={{'key': ..., "
            f"'secret': ...}}).save({block!r})"
        ) from None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, dict):
        raise UserError(
            f"Prefect Secret block {block!r} does not hold a JSON object of storage options: "
            "store e.g. {\"key\": ..., \"secret\": ...}"
        )
    return value


def resolve_storage_options(
    options: dict[str, Any] | None, secret_block: str | None, where: str = "storage_options"
) -> dict[str, Any]:
    """`options` with env references expanded and the Secret block's options merged over."""
    resolved = expand_env(dict(options or {}), where)
    if secret_block:
        resolved = {**resolved, **secret_options(secret_block)}
    return resolved


def with_credentials(spec: JobSpec) -> JobSpec:
    """The spec with its storage options resolved for this process (kept in memory only)."""
    output = spec.output
    options = resolve_storage_options(
        output.storage_options, output.storage_options_secret, "output.storage_options"
    )
    if options == output.storage_options:
        return spec
    return spec.model_copy(update={"output": output.model_copy(update={"storage_options": options})})


REDACTED = "<redacted>"
SECRET_PARAMETERS = ("storage_options", "out_storage_options")


def redacted_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """Flow parameters as the Prefect server may store and show them: storage option
    values redacted, in a spec object or mapping and in *storage_options parameters."""
    shown = dict(parameters)
    spec = shown.get("spec")
    if isinstance(spec, JobSpec):
        shown["spec"] = recorded_spec(spec)
    elif isinstance(spec, ImportSpec):
        shown["spec"] = recorded_import_spec(spec)
    elif isinstance(spec, dict) and isinstance(spec.get("output"), dict):
        output = dict(spec["output"])
        output["storage_options"] = _redact(output.get("storage_options"))
        shown["spec"] = {**spec, "output": output}
    elif isinstance(spec, dict):  # an import's options
        shown["spec"] = {
            **spec, **{name: _redact(spec[name]) for name in SECRET_PARAMETERS if name in spec}
        }
    for name in SECRET_PARAMETERS:
        if isinstance(shown.get(name), dict):
            shown[name] = _redact(shown[name])
    return shown


def _redact(options: Any) -> Any:
    if not isinstance(options, dict):
        return options
    return {key: REDACTED for key in options}
