"""``make demo``'s steps end to end (fewer images and epochs), twice, then ``make stop``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT
from tests.integration.conftest import free_port

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_script(
    module: str, env: dict[str, str], timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m scripts.<module>`` as ``make demo`` / ``make stop`` run it."""
    return subprocess.run(
        [sys.executable, "-m", f"scripts.{module}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_demo_runs_end_to_end_and_again(tmp_path: Path, redis_url: str) -> None:
    var = tmp_path / "var"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EMOTIONS_", "DEMO_"))},
        "EMOTIONS_VAR_DIR": str(var),
        "EMOTIONS_BROKER_URL": redis_url,
        "DEMO_PER_CLASS": "16",
        "DEMO_EPOCHS": "1",
        "DEMO_IMAGE_SIZE": "64",
        "DEMO_PORT": str(free_port()),
    }
    try:
        first = run_script("demo", env)
        assert first.returncode == 0, first.stderr[-4000:]
        document = json.loads(first.stdout[: first.stdout.index("\n}\n") + 2])
        assert document["predictions"] and document["num_images"] == 80
        assert "Summary:" in first.stderr and "make stop" in first.stderr
        assert "/docs" in first.stderr
        assert (var / "logs" / "api.log").exists() and (var / "logs" / "worker.log").exists()
        assert json.loads((var / "demo" / "results.json").read_text())["num_images"] == 80

        again = run_script("demo", env)
        assert again.returncode == 0, again.stderr[-4000:]
        assert "already champion" in again.stderr
        assert "already running" in again.stderr
        assert "already in" in again.stderr
    finally:
        stop = run_script("stop", env, timeout=120)
    assert "api" in stop.stderr and "worker" in stop.stderr
    assert not list((var / "run").glob("*.pid"))


def test_demo_falls_back_to_an_embedded_redis(tmp_path: Path, monkeypatch) -> None:
    import redis

    from scripts.demo import Demo
    from scripts.demo import stop_process

    monkeypatch.setenv("EMOTIONS_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.delenv("EMOTIONS_BROKER_URL", raising=False)
    monkeypatch.setenv("DEMO_LOCAL_REDIS", f"127.0.0.1:{free_port()}")  # nothing listens there
    demo = Demo()
    try:
        demo.broker()
        url = demo.env["EMOTIONS_BROKER_URL"]
        assert url.startswith("redis+socket://")
        client = redis.Redis(unix_socket_path=url.removeprefix("redis+socket://"))
        assert client.ping()
        demo.broker()  # a second run reuses the running one
        assert demo.env["EMOTIONS_BROKER_URL"] == url
    finally:
        assert stop_process(demo.run_dir / "redis.pid")
