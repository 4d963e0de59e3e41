"""The Prefect API a flow call talks to: fail fast with one line when it is not there.

With PREFECT_API_URL set, an unreachable server otherwise costs a minute of client
retries and ends in a long traceback. Without it, Prefect starts a temporary local
server, which on a busy machine can take longer than Prefect's default 20 s.
"""

from __future__ import annotations

import os

from schemas.errors import UserError

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
STARTUP_TIMEOUT_S = "120"
HEALTH_TIMEOUT_S = 5.0
EPHEMERAL_TIMEOUT_MESSAGE = "Timed out while attempting to connect to ephemeral Prefect API"


def patient_ephemeral_server() -> None:
    """Give a temporary local server time to start (call before Prefect reads its settings)."""
    os.environ.setdefault(STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_S)


def check_api(timeout: float = HEALTH_TIMEOUT_S) -> None:
    """Raise a one-line UserError when PREFECT_API_URL is set and does not answer."""
    import httpx
    from prefect.settings import PREFECT_API_KEY, PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        return  # a temporary local server will be started
    key = PREFECT_API_KEY.value()
    headers = {"Authorization": f"Bearer {key.get_secret_value()}"} if key else {}
    try:
        response = httpx.get(f"{url.rstrip('/')}/health", headers=headers, timeout=timeout)
        response.raise_for_status()
    except httpx.HTTPError as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise UserError(
            f"Prefect API {url} is unreachable ({reason}): start the server "
            "(`prefect server start`), fix PREFECT_API_URL, or unset it to use a "
            "temporary local server"
        ) from None


def ephemeral_timeout_message(error: BaseException) -> str | None:
    """One line for a temporary server that did not start in time; None for anything else."""
    if not (isinstance(error, RuntimeError) and EPHEMERAL_TIMEOUT_MESSAGE in str(error)):
        return None
    waited = os.environ.get(STARTUP_TIMEOUT_ENV, STARTUP_TIMEOUT_S)
    return (
        f"the temporary local Prefect server did not start within {waited} s: set "
        f"{STARTUP_TIMEOUT_ENV} higher, or start a server (`prefect server start`) and set "
        "PREFECT_API_URL"
    )
