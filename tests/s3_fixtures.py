"""A real S3-compatible server for tests: ``moto_server`` started as a separate process.

The S3 code path (s3fs over HTTP, credentials from the AWS variables, an explicit endpoint) is
the one MinIO serves in compose, so it is tested against a server process rather than an
in-process mock: API, workers and tests then talk to one store, as hosts do in production.
Registered as a plugin by ``tests/conftest.py`` so unit and integration tests share it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

#: Any key and secret do for moto; real ones must never reach a test.
AWS_ENV: dict[str, str] = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


@dataclass(frozen=True)
class MotoServer:
    """A running ``moto_server``: its endpoint, and helpers to arrange and inspect buckets."""

    endpoint_url: str

    def env(self) -> dict[str, str]:
        """What a worker process needs to read from this server."""
        return {**AWS_ENV, "EMOTIONS_S3_ENDPOINT_URL": self.endpoint_url}

    def client(self) -> Any:
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=AWS_ENV["AWS_DEFAULT_REGION"],
        )

    def create_bucket(self, name: str) -> str:
        """Create ``name`` unless it exists; parametrised tests reuse bucket names."""
        client = self.client()
        with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
            client.create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        paginator = self.client().get_paginator("list_objects_v2")
        return sorted(
            item["Key"]
            for page in paginator.paginate(Bucket=bucket, Prefix=prefix)
            for item in page.get("Contents", [])
        )

    def put(self, bucket: str, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=bucket, Key=key, Body=data)


def _moto_command() -> str | None:
    beside_python = Path(sys.executable).with_name("moto_server")
    return str(beside_python) if beside_python.exists() else shutil.which("moto_server")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_until_up(url: str, process: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto_server exited early:\n{log.read_text(errors='replace')}")
        try:
            with urllib.request.urlopen(url, timeout=1):
                return
        except urllib.error.HTTPError:
            return  # any HTTP answer means the server is serving
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"moto_server not up after {timeout}s:\n{log.read_text(errors='replace')}")


@pytest.fixture(scope="session")
def moto_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    """One ``moto_server -H 127.0.0.1 -p <free port>`` for the session, terminated at the end.

    The AWS variables are set in this process too (restored afterwards), because s3fs reads
    credentials from the environment, as it does in the services.
    """
    command = _moto_command()
    if command is None:
        pytest.skip('moto_server is not installed (pip install "moto[server]")')
    port = _free_port()
    log = tmp_path_factory.mktemp("moto") / "moto_server.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [command, "-H", "127.0.0.1", "-p", str(port)],
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    endpoint = f"http://127.0.0.1:{port}"
    saved = {name: os.environ.get(name) for name in AWS_ENV}
    try:
        _wait_until_up(endpoint, process, log, timeout=30)
        os.environ.update(AWS_ENV)
        yield MotoServer(endpoint)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
