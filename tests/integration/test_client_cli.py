"""The client commands against a real gunicorn API process and a real worker process."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import ROOT
from tests.integration.test_batch_jobs import write_faces

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def api_server(services, tmp_path: Path):
    port = free_port()
    log = (tmp_path / "api.log").open("wb")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--preload",
            "api.wsgi:app",
        ],
        cwd=ROOT,
        env=services.env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if requests.get(f"{url}/healthz", timeout=1).ok:
                break
        except requests.ConnectionError:
            time.sleep(0.3)
        assert process.poll() is None, (tmp_path / "api.log").read_text()
    yield url
    process.terminate()
    process.wait(15)
    log.close()


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "human_face_emotions.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=180,
    )


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_submit_wait_status_results(services, api_server: str, start_worker, tmp_path) -> None:
    start_worker()
    env = services.env(EMOTIONS_API_URL=api_server)
    faces = write_faces(tmp_path / "mine", 5, size=48)
    (tmp_path / "mine" / "broken.png").write_bytes(b"nope")

    submitted = run_cli("submit", str(tmp_path / "mine"), "--wait", "--batch-size", "2", env=env)
    assert submitted.returncode == 0, submitted.stderr
    document = json.loads(submitted.stdout)
    assert document["num_images"] == len(faces)
    assert document["num_errors"] == 1 and document["errors"][0]["image_path"] == "broken.png"
    assert {p["image_path"] for p in document["predictions"]} == {f.name for f in faces}
    assert "Summary:" in submitted.stderr

    job_id = document["job_id"]
    status = run_cli("status", job_id, env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "completed_with_errors"
    csv_out = tmp_path / "out.csv"
    exported = run_cli("results", job_id, "--format", "csv", "-o", str(csv_out), env=env)
    assert exported.returncode == 0, exported.stderr
    lines = csv_out.read_text().strip().splitlines()
    assert lines[0].startswith("image_path,") and len(lines) == 1 + 6

    write_faces(services.data_root / "shared", 3, size=48)
    folder = run_cli("submit", "shared", "--folder", "--wait", "--format", "jsonl", env=env)
    assert folder.returncode == 0, folder.stderr
    assert len(folder.stdout.strip().splitlines()) == 3

    # User errors exit with 2 and one clear line.
    missing = run_cli("status", "00000000-0000-0000-0000-000000000000", env=env)
    assert missing.returncode == 2 and "404" in missing.stderr
    escape = run_cli("submit", "../etc", "--folder", env=env)
    assert escape.returncode == 2 and "400" in escape.stderr
    unreachable = run_cli("status", job_id, env={**env, "EMOTIONS_API_URL": "http://127.0.0.1:9"})
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr
