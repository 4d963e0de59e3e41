"""Shared fixtures: one tiny models directory and one Prefect server per test session."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.s3_fixture", "tests.real_photos"]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete models directory with tiny random weights, in the published layout."""
    from arc2face_engine.testing.tiny_models import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One temporary Prefect server (SQLite in a temp PREFECT_HOME) for the session."""
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    os.environ["PREFECT_LOGGING_LEVEL"] = "WARNING"
    os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    # A queued slot request retries within a second of its denial (the default waits up to
    # 30 s after a long hold), so shards queued on a device slot start soon after it frees.
    os.environ["PREFECT_SERVER_CONCURRENCY_MAXIMUM_CONCURRENCY_SLOT_WAIT_SECONDS"] = "1"
    from prefect.testing.utilities import prefect_test_harness

    logging.getLogger("distributed").setLevel(logging.WARNING)
    with prefect_test_harness(server_startup_timeout=120):
        yield
