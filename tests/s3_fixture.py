"""An S3 API on loopback (moto's ThreadedMotoServer) for tests that write through s3fs.

Use it from a test module with `pytest_plugins = ["tests.s3_fixture"]` (or import the
fixtures in conftest.py). `s3_uri` yields `(uri, storage_options)` for a fresh,
empty bucket; the options are plain JSON so they can go into a job spec.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

DUMMY_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # No real AWS config or instance metadata lookups (slow, and not ours to touch).
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """The endpoint URL of one moto S3 server for the whole test session."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as patch:
        for name, value in DUMMY_CREDENTIALS.items():
            patch.setenv(name, value)
        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_uri(s3_endpoint: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(s3://<fresh bucket>, storage_options) against the loopback server."""
    import s3fs

    storage_options: dict[str, Any] = {
        "key": DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "secret": DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        "client_kwargs": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"},
    }
    bucket = f"test-{uuid.uuid4().hex[:12]}"
    # Without region_name: s3fs would send a us-east-1 LocationConstraint, which S3 rejects.
    fs = s3fs.S3FileSystem(
        key=storage_options["key"],
        secret=storage_options["secret"],
        client_kwargs={"endpoint_url": s3_endpoint},
    )
    fs.mkdir(bucket)
    yield f"s3://{bucket}", storage_options
    fs.rm(bucket, recursive=True)
    fs.invalidate_cache()
