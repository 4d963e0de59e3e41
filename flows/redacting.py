"""Flows whose stored parameters hold no storage credentials (flows/credentials.py)."""

from __future__ import annotations

from typing import Any

from prefect import Flow

from flows.credentials import redacted_parameters


class RedactingFlow(Flow):
    """A flow whose stored parameters (server database, UI) hold no storage credentials;
    the flow function itself still gets the real values in its own process."""

    def serialize_parameters(self, parameters: dict[str, Any]) -> dict[str, Any]:
        return super().serialize_parameters(redacted_parameters(parameters))
