"""Observability against real services: queue depths from Redis in the API's ``/metrics``,
and a real ``celery worker`` serving its pool processes' metrics and writing JSON logs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import redis
from celery import Celery

from api import create_app
from api.cluster_metrics import queue_keys
from face_emotions.settings import Settings
from tests.integration.conftest import free_port
from tests.unit.test_api import ADMIN_TOKEN
from tests.unit.test_api import FakeQueue
from tests.unit.test_api import FakeRegistry
from tests.unit.test_api import version
from tests.unit.test_metrics import samples
from tests.unit.test_metrics import value

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
#: Queues of this file's own: no worker of another test consumes them.
TRAINING_QUEUE = "metrics-test-training"
WORKER_QUEUE = "metrics-test-inference"


def test_queue_depth_counts_every_priority_list(redis_url: str, tmp_path: Path) -> None:
    client = redis.Redis.from_url(redis_url)
    client.delete(*queue_keys(TRAINING_QUEUE))
    sender = Celery("metrics-test", broker=redis_url)
    try:
        for priority in (None, None, 5, 9):  # kombu puts 5 in the "3" list, 9 in the "9" one
            sender.send_task("emotions.train", args=["x"], queue=TRAINING_QUEUE, priority=priority)
        assert client.llen(TRAINING_QUEUE) == 2  # the plain list holds priority 0 only
        (tmp_path / "data").mkdir()
        settings = Settings(
            var_dir=tmp_path / "var",
            data_root=tmp_path / "data",
            admin_token=ADMIN_TOKEN,
            broker_url=redis_url,
            training_queue=TRAINING_QUEUE,
        )
        app = create_app(
            settings, broker=FakeQueue(), registry_factory=lambda: FakeRegistry([version(1)])
        )
        text = app.test_client().get("/metrics").get_data(as_text=True)
        assert value(text, "emotions_queue_length", queue=TRAINING_QUEUE) == 4
        assert value(text, "emotions_queue_length", queue="inference") is not None
        assert value(text, "emotions_dependency_up", dependency="broker") == 1
    finally:
        client.delete(*queue_keys(TRAINING_QUEUE))
        sender.close()


def test_worker_serves_multiprocess_metrics_and_logs_json(redis_url: str, tmp_path: Path) -> None:
    port = free_port()
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    (metrics_dir / "counter_1.db").write_bytes(b"left over by a previous run")
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")}
    env.update(
        EMOTIONS_BROKER_URL=redis_url,
        EMOTIONS_VAR_DIR=str(tmp_path / "var"),
        EMOTIONS_DEVICE="cpu",
        EMOTIONS_WORKER_METRICS_PORT=str(port),
        EMOTIONS_WORKER_METRICS_DIR=str(metrics_dir),
        EMOTIONS_LOG_FORMAT="json",
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "the-apis"),  # inherited: must not be used
    )
    log_path = tmp_path / "worker.log"
    with log_path.open("wb") as log:
        worker = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "celery",
                "-A",
                "worker.app",
                "worker",
                "-Q",
                WORKER_QUEUE,
                "--concurrency",
                "2",
                "--without-gossip",
                "--without-mingle",
                "--loglevel",
                "INFO",
                "-n",
                f"metrics-{os.getpid()}@%h",
            ],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + 60
            while b"ready." not in log_path.read_bytes():
                assert worker.poll() is None, log_path.read_text()
                assert time.monotonic() < deadline, log_path.read_text()
                time.sleep(0.2)
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                text = r.read().decode()
            assert value(text, "emotions_images_failed_total") == 0  # not the leftover file
            assert value(text, "emotions_microbatch_size_count") == 0
            # Multiprocess mode: the main process wrote its samples to the directory.
            assert (metrics_dir / f"counter_{worker.pid}.db").exists()
            assert not (metrics_dir / "counter_1.db").exists()
            assert not (tmp_path / "the-apis").exists()
        finally:
            os.killpg(worker.pid, signal.SIGTERM)
            worker.wait(30)
    lines = [line for line in log_path.read_text().splitlines() if line.startswith("{")]
    records = [json.loads(line) for line in lines]
    ready = [r for r in records if r["message"].endswith("ready.")]
    assert ready and {"timestamp", "level", "logger"} <= set(ready[0])
    assert any(r["logger"] == "worker.metrics_server" for r in records)


@pytest.mark.slow
@pytest.mark.parametrize("services", ["postgresql"], indirect=True)
def test_after_a_job_both_metrics_endpoints_count_its_images(services, api, start_worker) -> None:
    """The API's cluster-wide counter (from the database) and the worker's own counter (its
    pool processes, multiprocess mode) both equal the job's image count; the micro-batch
    histogram saw every image once."""
    import io

    from tests.integration.conftest import wait_for_job
    from tests.integration.test_batch_jobs import face_png

    port = free_port()
    start_worker("scraped", EMOTIONS_WORKER_METRICS_PORT=str(port))
    files = [(io.BytesIO(face_png(i)), f"face_{i}.png") for i in range(7)]
    response = api.post("/api/v1/jobs", data={"files": files, "batch_size": "3"})
    assert response.status_code == 202, response.get_json()
    job = wait_for_job(api, response.get_json()["id"])
    assert job["status"] == "succeeded" and job["done"] == 7

    text = api.get("/metrics").get_data(as_text=True)
    assert value(text, "emotions_job_images_processed_total") == 7
    assert value(text, "emotions_job_images_failed_total") == 0
    assert value(text, "emotions_jobs", status="succeeded") == 1

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        worker_text = reply.read().decode()
    processed = {
        labels: number
        for (name, labels), number in samples(worker_text).items()
        if name == "emotions_images_processed_total"
    }
    assert sum(processed.values()) == 7, processed
    assert value(worker_text, "emotions_microbatch_size_sum") == 7
    assert value(worker_text, "emotions_microbatch_size_count") == 3  # 3 + 3 + 1
    assert value(worker_text, "emotions_forward_seconds_count") == 3
    assert value(worker_text, "emotions_decode_seconds_count") == 3
