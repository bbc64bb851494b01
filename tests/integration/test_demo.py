"""``make demo``'s steps end to end (fewer images and epochs), twice, then ``make stop``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from face_emotions.data.sample_faces import write_sample_dataset
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


def demo_document(result: subprocess.CompletedProcess) -> dict:
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout[: result.stdout.index("\n}\n") + 2])


def metric_total(url: str, name: str) -> float:
    """The sum of a counter's samples on the API's /metrics (every gunicorn worker's)."""
    text = requests.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") or line.startswith(name + " ")
    )


def retrain_as_the_console_does(url: str, timeout: float = 300) -> dict:
    """The Models page's form: POST /api/v1/training-runs with its fields, then poll."""
    body = {
        "data": "faces",
        "model": "cnn",
        "epochs": 2,
        "promote": "force",
        "overrides": ["model.image_size=64", "training=fast", "training.augment=false"],
    }
    response = requests.post(f"{url}/api/v1/training-runs", json=body, timeout=60)
    assert response.status_code == 202, response.text
    assert "warning" not in response.json(), response.json()  # the demo runs a trainer
    location = url + response.headers["Location"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = requests.get(location, timeout=30).json()
        if run["status"] in {"succeeded", "failed", "cancelled"}:
            return run
        time.sleep(1)
    raise TimeoutError(f"training run not finished: {run}")


def test_demo_runs_end_to_end_retrains_and_runs_again(tmp_path: Path, redis_url: str) -> None:
    var = tmp_path / "var"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("EMOTIONS_", "DEMO_"))},
        "EMOTIONS_VAR_DIR": str(var),
        "EMOTIONS_BROKER_URL": redis_url,
        "DEMO_PER_CLASS": "16",
        "DEMO_EPOCHS": "1",
        "DEMO_IMAGE_SIZE": "64",
        "DEMO_PORT": str(port),
    }
    own = tmp_path / "elsewhere" / "mine"
    write_sample_dataset(own, per_class=3, seed=4, progress=False)
    try:
        first = run_script("demo", env)
        document = demo_document(first)
        assert document["predictions"] and document["num_images"] == 80
        assert "Summary:" in first.stderr and "make stop" in first.stderr
        assert "/docs" in first.stderr and f"Web console   {url}/" in first.stderr
        for name in ("api", "worker", "trainer"):
            assert (var / "logs" / f"{name}.log").exists(), name
        assert json.loads((var / "demo" / "results.json").read_text())["num_images"] == 80
        assert requests.get(f"{url}/readyz", timeout=30).json()["warnings"] == []

        # A run from the console ends with a new version served by the running worker.
        worker_pid = int((var / "run" / "worker.pid").read_text())
        run = retrain_as_the_console_does(url)
        assert run["status"] == "succeeded" and run["promoted"], run
        new = run["registered_version"]
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            models = requests.get(f"{url}/api/v1/models", timeout=30).json()
            if models["workers"] and {w["model_version"] for w in models["workers"]} == {new}:
                break
            time.sleep(1)
        assert {w["model_version"] for w in models["workers"]} == {new}, models
        assert int((var / "run" / "worker.pid").read_text()) == worker_pid, "restarted"

        # Counters of both gunicorn workers are summed: they never go down between scrapes.
        counts = [metric_total(url, "emotions_api_requests_total") for _ in range(6)]
        assert counts == sorted(counts), counts

        again = run_script("demo", env)
        assert demo_document(again)["num_images"] == 80
        assert "already champion" in again.stderr
        assert "already running" in again.stderr
        assert "already in" in again.stderr
        assert json.loads((var / "demo" / "results.json").read_text())["predictions"]

        # Another data root, with the services still running, then the default one again.
        mine = run_script("demo", {**env, "DEMO_DATA": str(own)})
        assert demo_document(mine)["num_images"] == 15
        assert "EMOTIONS_DATA_ROOT changed" in mine.stderr
        back = run_script("demo", env)
        assert demo_document(back)["num_images"] == 80
        assert "EMOTIONS_DATA_ROOT changed" in back.stderr
    finally:
        stop = run_script("stop", env, timeout=120)
    assert all(name in stop.stderr for name in ("api", "worker", "trainer"))
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
