"""The client commands against a real gunicorn API process and a real worker process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import ROOT
from tests.integration.conftest import gunicorn
from tests.integration.test_batch_jobs import write_faces

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture
def api_server(services, tmp_path: Path):
    with gunicorn(services.env(), tmp_path / "api.log", "--workers", "2", "--preload") as url:
        yield url


def run_cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "face_emotions.cli.main", *args],
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
