"""Shared fixtures: a moto server on loopback, boto3 clients to arrange AWS state, the anyio backend."""

from __future__ import annotations

import os
import urllib.request
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

# Fake credentials for moto; set before any client is built. Real ones never reach the tests.
for _name, _value in {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}.items():
    os.environ[_name] = _value
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def anyio_backend() -> str:
    """Run async tests on asyncio, the controller's event loop."""
    return "asyncio"


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    """One moto server on a free loopback port for the whole run; yields its endpoint URL."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture
def aws_endpoint(moto_server: str) -> str:
    """The moto endpoint, with every service's state reset before the test."""
    request = urllib.request.Request(f"{moto_server}/moto-api/reset", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    return moto_server


def boto_client(service: str, endpoint: str) -> Any:
    """A synchronous boto3 client for arranging and inspecting state in moto."""
    return boto3.client(service, endpoint_url=endpoint, region_name="us-east-1")
