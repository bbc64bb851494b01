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
    with gunicorn(services.env(), tmp_path / "api.log", "--workers", "2") as url:
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
    for prediction in document["predictions"]:  # the seed's record, with its faces
        assert prediction["faces_found"] is not None and prediction["faces"]
    assert "Summary:" in submitted.stderr
    assert "images without a face (classified whole)" in submitted.stderr

    job_id = document["job_id"]
    status = run_cli("status", job_id, env=env)
    assert status.returncode == 0 and json.loads(status.stdout)["status"] == "completed_with_errors"
    csv_out = tmp_path / "out.csv"
    exported = run_cli("results", job_id, "--format", "csv", "-o", str(csv_out), env=env)
    assert exported.returncode == 0, exported.stderr
    lines = csv_out.read_text().strip().splitlines()
    assert lines[0].startswith("image_path,") and len(lines) == 1 + 6

    write_faces(services.data_root / "shared", 3, size=48)
    folder = run_cli(
        "submit", "shared", "--folder", "--wait", "--format", "jsonl", "--faces", "none", env=env
    )
    assert folder.returncode == 0, folder.stderr
    lines = [json.loads(line) for line in folder.stdout.strip().splitlines()]
    assert len(lines) == 3
    assert all(line["faces_found"] is None for line in lines)  # whole images, as asked

    # User errors exit with 2 and one clear line.
    missing = run_cli("status", "00000000-0000-0000-0000-000000000000", env=env)
    assert missing.returncode == 2 and "404" in missing.stderr
    escape = run_cli("submit", "../etc", "--folder", env=env)
    assert escape.returncode == 2 and "400" in escape.stderr
    unreachable = run_cli("status", job_id, env={**env, "EMOTIONS_API_URL": "http://127.0.0.1:9"})
    assert unreachable.returncode == 2 and "cannot reach" in unreachable.stderr


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_folders_keep_their_paths_and_short_ids_list_and_cancel(
    services, api_server: str, tmp_path
) -> None:
    """`submit ./folder` keeps Angry/face_0000.png and Fear/face_0000.png apart; the
    8-character ids the console shows work in `status`; `jobs` lists and `cancel` stops a job
    (no worker runs, so it stays queued until cancelled)."""
    env = services.env(EMOTIONS_API_URL=api_server)
    for emotion in ("Angry", "Fear"):
        write_faces(tmp_path / "faces" / emotion, 1, size=48)
    submitted = run_cli("submit", str(tmp_path / "faces"), env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip()

    short = job_id[:8]
    status = run_cli("status", short, env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["id"] == job_id
    listed = run_cli("jobs", env=env)
    assert listed.returncode == 0 and short in listed.stdout and "queued" in listed.stdout
    assert run_cli("status", job_id[:5], env=env).returncode == 2  # too short to be unique

    results = run_cli("results", short, "--format", "csv", env=env)
    assert results.returncode == 0, results.stderr
    cancelled = run_cli("cancel", short, env=env)
    assert cancelled.returncode == 0, cancelled.stderr
    assert f"job {job_id}: cancelled" in cancelled.stdout

    from face_emotions.jobs.database import create_db_engine
    from face_emotions.jobs.database import session_factory
    from face_emotions.jobs.schema import Image

    engine = create_db_engine(services.database_url)
    with session_factory(engine)() as session:
        paths = sorted(image.path for image in session.query(Image))
    engine.dispose()
    assert paths == ["Angry/face_0000.png", "Fear/face_0000.png"]
