"""Shared fixtures: one tiny models directory per test session."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete models directory with tiny random weights, in the published layout."""
    from arc2face_engine.tiny import write_tiny_models

    return write_tiny_models(tmp_path_factory.mktemp("models"))
