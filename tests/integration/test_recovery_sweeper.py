"""What the recovery sweeper cleans up after crashes and outages (issue 14), against the real
services: uploads left by an API SIGKILLed mid-upload, and training runs accepted while the
broker was down."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import socket
import threading
import time
import uuid
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image as PILImage
from sqlalchemy import select
from sqlalchemy import update

from face_emotions.data.storage import Storage
from face_emotions.jobs import training_runs as db_runs
from face_emotions.jobs.broker import BrokerClient
from face_emotions.jobs.database import create_db_engine
from face_emotions.jobs.database import session_factory
from face_emotions.jobs.orphan_uploads import remove_orphan_uploads
from face_emotions.jobs.schema import Job
from face_emotions.jobs.schema import TrainingRun
from face_emotions.jobs.schema import utcnow
from scripts.launcher import Launcher
from scripts.launcher import free_port
from tests.integration.conftest import ROOT
from tests.integration.conftest import Services
from tests.integration.conftest import _redis_client
from worker.recovery import RecoverySweeper

pytestmark = pytest.mark.integration

#: The killed upload: enough files that the kill lands while they are being written.
UPLOAD_FILES = 120


def noise_png(side: int = 256) -> bytes:
    """An incompressible PNG (~200 KB): a valid image, so no intake check refuses it."""
    pixels = np.random.default_rng(14).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG", compress_level=0)
    return buffer.getvalue()


def multipart(files: int, image: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    parts = [
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="files"; '
            f'filename="face-{n:03d}.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + image
        + b"\r\n"
        for n in range(files)
    ]
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), boundary


def send_raw(url: str, body: bytes, boundary: str) -> None:
    """POST the body over a raw socket and read until the server goes away (it is killed)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=60) as sock:
        head = (
            f"POST /api/v1/jobs HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        with contextlib.suppress(OSError):
            sock.sendall(head.encode() + body)
            while sock.recv(65536):
                pass


def upload_dirs(jobs: Path, ignore: set[str]) -> list[Path]:
    with contextlib.suppress(FileNotFoundError):
        return [entry for entry in jobs.iterdir() if entry.name not in ignore]
    return []


def file_count(folder: Path) -> int:
    return sum(len(names) for _, _, names in os.walk(folder))


def job_ids(services: Services) -> set[str]:
    engine = create_db_engine(services.database_url)
    try:
        with session_factory(engine)() as session:
            return {str(job_id) for job_id in session.scalars(select(Job.id))}
    finally:
        engine.dispose()


@pytest.mark.slow
def test_uploads_of_an_api_killed_mid_upload_are_removed(
    services: Services, tmp_path: Path
) -> None:
    """SIGKILL the API's process group while it writes a large upload into storage: files
    without a job row stay behind. The sweeper removes them (after the grace period; 0 here),
    and leaves a real job's uploads alone."""
    storage_dir = tmp_path / "storage"
    env = services.env(EMOTIONS_STORAGE_URL=f"file://{storage_dir}")
    launcher = Launcher(env, tmp_path, cwd=ROOT, append_logs=False)
    image = noise_png()
    body, boundary = multipart(UPLOAD_FILES, image)
    orphan: Path | None = None
    real_job = ""
    for _attempt in range(3):  # a kill that came after the commit leaves no orphan: again
        server = launcher.api("--workers", "1", port=free_port(), ready_path="/healthz")
        try:
            server.wait_ready(90)
            assert server.url is not None
            if not real_job:
                response = requests.post(
                    f"{server.url}/api/v1/jobs",
                    files=[("files", ("kept.png", image, "image/png"))],
                    timeout=60,
                )
                assert response.status_code == 202, response.text
                real_job = response.json()["id"]
            known = {real_job, *job_ids(services)}
            sender = threading.Thread(target=send_raw, args=(server.url, body, boundary))
            sender.start()
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(
                file_count(d) for d in upload_dirs(storage_dir / "jobs", known)
            ):
                time.sleep(0.002)
            os.killpg(server.pid, signal.SIGKILL)  # the API and its workers, mid-write
            sender.join(30)
        finally:
            server.stop(5, signal.SIGKILL)
        leftovers = upload_dirs(storage_dir / "jobs", known)
        assert leftovers, f"the upload never reached storage:\n{server.log_tail()}"
        if leftovers[0].name not in job_ids(services):
            orphan = leftovers[0]
            break
    assert orphan is not None, "every kill came after the job was committed"
    left = file_count(orphan)
    assert 0 < left < UPLOAD_FILES, left  # a part of the upload, and no job row
    assert orphan.name not in job_ids(services)

    settings = services.settings(
        storage_url=f"file://{storage_dir}", orphan_upload_grace_seconds=0, sweep_seconds=0.1
    )
    storage = Storage.from_url(settings.resolved_storage_url)
    engine = create_db_engine(services.database_url)
    try:  # inside the default grace period, a fresh leftover may be an upload in progress
        young = remove_orphan_uploads(session_factory(engine), storage, grace_seconds=3600)
    finally:
        engine.dispose()
    assert young.removed == [] and orphan.exists()

    sweeper = RecoverySweeper(BrokerClient(services.broker_url), settings)
    try:
        report = sweeper.run_once()
    finally:
        sweeper.stop()
    assert report is not None, "another sweeper held the lock"
    assert report.orphan_uploads_removed == [f"jobs/{orphan.name}"]
    assert not orphan.exists()
    assert sorted(p.name for p in (storage_dir / "jobs" / real_job).iterdir()) == ["kept.png"]


def queued_messages(services: Services, queue: str = "training") -> list[dict]:
    """The task messages waiting in a Redis queue: kwargs and task id of each."""
    client = _redis_client(int(services.broker_url.rsplit("/", 1)[1]))
    messages = []
    for raw in client.lrange(queue, 0, -1):
        payload = json.loads(raw)
        body = (
            base64.b64decode(payload["body"])
            if payload["properties"].get("body_encoding") == "base64"
            else payload["body"].encode()
        )
        _args, kwargs, _embed = json.loads(body)
        messages.append(kwargs)
    return messages


def test_a_run_accepted_while_the_broker_is_down_is_sent_by_the_sweeper(
    services: Services,
) -> None:
    """The API answers 202 with a warning and stores the run queued and unsent; once the
    broker is back the sweeper sends it (a run a few seconds old is left to its request)."""
    from api.app import create_app

    (services.data_root / "faces" / "Happy").mkdir(parents=True)
    closed = f"redis://127.0.0.1:{free_port()}/0"
    app = create_app(services.settings(broker_url=closed))
    response = app.test_client().post(
        "/api/v1/training-runs", json={"data": "faces", "epochs": 1, "promote": "never"}
    )
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert body["status"] == "queued"
    assert "not sent to a trainer: the broker is unreachable" in body["warning"]
    assert "recovery sweeper sends it once the broker is back" in body["warning"]

    run_id = uuid.UUID(body["id"])
    engine = create_db_engine(services.database_url)
    sessions = session_factory(engine)
    settings = services.settings(sweep_seconds=0.1)
    sweeper = RecoverySweeper(BrokerClient(services.broker_url), settings)
    try:
        with sessions() as session:
            row = session.get(TrainingRun, run_id)
            assert row is not None and row.dispatched_at is None and row.status == "queued"
        report = sweeper.run_once()
        assert report is not None and report.training_runs_sent == []  # its request's own
        assert queued_messages(services) == []

        with sessions() as session:  # the outage lasted a minute
            session.execute(
                update(TrainingRun)
                .where(TrainingRun.id == run_id)
                .values(created_at=utcnow() - timedelta(minutes=1))
            )
            session.commit()
        time.sleep(0.2)  # the fleet's sweep lock (one sweep period) expires
        report = sweeper.run_once()
        assert report is not None and report.training_runs_sent == [str(run_id)]
        with sessions() as session:
            row = session.get(TrainingRun, run_id)
            assert row is not None and row.dispatched_at is not None
            token = db_runs.dispatch_token(row.dispatched_at)
        assert queued_messages(services) == [{"run_id": str(run_id), "dispatch": token}]

        time.sleep(0.2)
        report = sweeper.run_once()
        assert report is not None and report.training_runs_sent == []  # sent once
        assert len(queued_messages(services)) == 1
    finally:
        sweeper.stop()
        engine.dispose()
