"""Observability: the API's ``/metrics``, the cluster collector, the workers' multiprocess
metrics and the JSON log format.

Queue depths from a real Redis are in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import subprocess
import sys
import urllib.request
import uuid
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import create_engine
from sqlalchemy import update
from sqlalchemy.orm import sessionmaker

from api import create_app
from api.cluster_metrics import ClusterCollector
from api.cluster_metrics import queue_keys
from api.cluster_metrics import redis_url_of
from api.extensions import services
from face_emotions.jobs import worker_heartbeats
from face_emotions.jobs.schema import WorkerState
from face_emotions.ops.log_format import JobLogger
from face_emotions.ops.log_format import apply_format
from face_emotions.ops.log_format import configure_logging
from face_emotions.ops.log_format import job_context
from face_emotions.ops.log_format import json_formatter
from face_emotions.ops.prometheus_multiprocess import ENV
from face_emotions.ops.prometheus_multiprocess import multiprocess_registry
from face_emotions.ops.prometheus_multiprocess import prepare_multiprocess_dir
from face_emotions.settings import Settings
from tests.unit.test_api import FakeQueue
from tests.unit.test_api import FakeRegistry
from tests.unit.test_api import api_settings
from tests.unit.test_api import authed_client
from tests.unit.test_api import simulate_worker
from tests.unit.test_api import upload
from tests.unit.test_api import version
from worker.metrics_server import WorkerMetrics

ROOT = Path(__file__).resolve().parents[2]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """``{(sample name, labels): value}`` of a text exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(text: str, name: str, **labels: str) -> float | None:
    return samples(text).get((name, frozenset(labels.items())))


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return api_settings(tmp_path)


@pytest.fixture
def app(settings: Settings):
    return create_app(
        settings,
        broker=FakeQueue(),
        registry_factory=lambda: FakeRegistry([version(1, ("champion",))]),
    )


@pytest.fixture
def client(app) -> FlaskClient:
    return authed_client(app)


def scrape(app) -> str:
    """``/metrics`` without a token: it is public."""
    response = app.test_client().get("/metrics")
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return response.get_data(as_text=True)


# -- API requests ----------------------------------------------------------------------------


def test_requests_are_counted_by_url_rule_method_and_status(app, client: FlaskClient) -> None:
    rule = "/api/v1/jobs/<uuid:job_id>"
    before = scrape(app)
    job_id = upload(client, ["a.png"]).get_json()["id"]
    assert client.get(f"/api/v1/jobs/{job_id}").status_code == 200
    assert client.get(f"/api/v1/jobs/{uuid.uuid4()}").status_code == 404
    assert client.get("/no/such/page").status_code == 404
    after = scrape(app)

    def delta(name: str, **labels: str) -> float:
        return (value(after, name, **labels) or 0) - (value(before, name, **labels) or 0)

    assert delta("emotions_api_requests_total", route=rule, method="GET", status="200") == 1
    assert delta("emotions_api_requests_total", route=rule, method="GET", status="404") == 1
    assert delta("emotions_api_requests_total", route="/api/v1/jobs", method="POST", status="202")
    assert delta("emotions_api_requests_total", route="unmatched", method="GET", status="404")
    assert delta("emotions_api_request_seconds_count", route=rule, method="GET") == 2
    assert job_id not in after  # a rule, never a raw path: no series per job


def test_metrics_is_public_unlimited_and_undocumented(app) -> None:
    anonymous = app.test_client()
    for _ in range(3):
        assert anonymous.get("/metrics").status_code == 200
    spec = anonymous.get("/openapi.json").get_json()
    assert "/metrics" not in spec["paths"]


# -- cluster figures from the database -------------------------------------------------------


def test_jobs_by_status_and_image_counters_come_from_the_database(app, client) -> None:
    finished = upload(client, [f"f{i}.png" for i in range(5)]).get_json()["id"]
    simulate_worker(app, finished)  # 4 predictions, 1 per-image error
    upload(client, ["q1.png", "q2.png"])
    upload(client, ["q3.png"])
    text = scrape(app)
    assert value(text, "emotions_jobs", status="completed_with_errors") == 1
    assert value(text, "emotions_jobs", status="queued") == 2
    assert value(text, "emotions_jobs", status="succeeded") == 0  # every status has a sample
    assert value(text, "emotions_job_images_submitted_total") == 8
    assert value(text, "emotions_job_images_processed_total") == 4
    assert value(text, "emotions_job_images_failed_total") == 1
    assert value(text, "emotions_job_images_pending") == 3
    assert value(text, "emotions_dependency_up", dependency="database") == 1


def test_workers_model_versions_within_the_freshness_window(app) -> None:
    with app.app_context(), services().sessions() as session:
        for name, version_number in (("gpu-a:11", 3), ("gpu-b:12", 4), ("old:13", 2)):
            worker_heartbeats.touch_worker(
                session, name, model_version=version_number, device="cpu", backend="torch"
            )
        worker_heartbeats.touch_worker(
            session, "loading:14", model_version=None, device=None, backend=None
        )
        session.execute(
            update(WorkerState)
            .where(WorkerState.name == "old:13")
            .values(last_seen=datetime.now(UTC) - timedelta(hours=1))
        )
        session.commit()
    text = scrape(app)
    assert value(text, "emotions_worker_model_version", worker="gpu-a:11") == 3
    assert value(text, "emotions_worker_model_version", worker="gpu-b:12") == 4
    assert value(text, "emotions_worker_model_version", worker="old:13") is None
    assert value(text, "emotions_workers") == 3


def test_a_database_outage_leaves_its_metrics_out_but_metrics_answers(
    app, client, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    client.get("/healthz")
    dead = sessionmaker(create_engine("postgresql+psycopg://nobody@127.0.0.1:1/none"))
    with app.app_context():
        monkeypatch.setattr(services(), "sessions", dead)
    text = scrape(app)
    assert value(text, "emotions_dependency_up", dependency="database") == 0
    assert "emotions_jobs" not in text
    assert "emotions_api_requests_total" in text
    assert "database unreadable" in caplog.text


def test_a_broker_outage_gives_no_queue_sample() -> None:
    collector = ClusterCollector(
        lambda: sessionmaker(create_engine("sqlite://")),
        broker_url="redis://127.0.0.1:1/0",
        queues=["inference"],
    )
    names = {sample.name: sample for metric in collector.collect() for sample in metric.samples}
    assert "emotions_queue_length" not in names
    broker_up = [
        sample
        for metric in collector.collect()
        for sample in metric.samples
        if sample.labels.get("dependency") == "broker"
    ]
    assert broker_up[0].value == 0


def test_queue_keys_follow_kombus_priority_lists() -> None:
    assert queue_keys("inference") == [
        "inference",
        "inference\x06\x163",
        "inference\x06\x166",
        "inference\x06\x169",
    ]
    assert redis_url_of("redis+socket:///tmp/r.sock") == "unix:///tmp/r.sock"
    assert redis_url_of("rediss://h:6380/1") == "rediss://h:6380/1"
    assert redis_url_of("memory://") is None


# -- worker metrics in multiprocess mode -----------------------------------------------------

CHILD = """
import sys
from face_emotions.ops import inference_metrics as metrics
metrics.record_batch(processed=3, failed=1, model_version=2, forward_images=4,
                     forward_seconds=0.2, decode_seconds=0.05)
metrics.observe_decode(0.01)
metrics.count_images(processed=2, failed=0, model_version=3)
metrics.set_model_version(sys.argv[1], 3)
metrics.set_worker_device(sys.argv[1], sys.argv[2])
print("written", flush=True)
sys.stdin.readline()  # stay alive until the test has read the live gauge
"""


def pool_process(directory: Path, worker: str, device: str = "cpu") -> subprocess.Popen:
    env = {**os.environ, ENV: str(directory)}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, worker, device],
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "written"
    return child


def finish(child: subprocess.Popen) -> None:
    assert child.stdin is not None
    child.stdin.close()
    assert child.wait(30) == 0


def collected(directory: Path) -> str:
    from prometheus_client.exposition import generate_latest

    return generate_latest(multiprocess_registry(directory)).decode()


def test_worker_helpers_add_up_across_pool_processes(tmp_path: Path) -> None:
    first = pool_process(tmp_path, "host:1", "cuda:0")
    second = pool_process(tmp_path, "host:2", "cuda:1")
    text = collected(tmp_path)
    assert value(text, "emotions_images_processed_total", model_version="2") == 6
    assert value(text, "emotions_images_processed_total", model_version="3") == 4
    assert value(text, "emotions_images_failed_total") == 2
    assert value(text, "emotions_microbatch_size_count") == 2
    assert value(text, "emotions_microbatch_size_bucket", le="4.0") == 2
    assert value(text, "emotions_microbatch_size_bucket", le="2.0") == 0
    assert value(text, "emotions_forward_seconds_sum") == pytest.approx(0.4)
    assert value(text, "emotions_decode_seconds_count") == 4
    assert value(text, "emotions_model_version", worker="host:1") == 3
    assert value(text, "emotions_model_version", worker="host:2") == 3
    # Issue 15: which GPU each pool process runs on.
    assert value(text, "emotions_worker_device_info", worker="host:1", device="cuda:0") == 1
    assert value(text, "emotions_worker_device_info", worker="host:2", device="cuda:1") == 1

    finish(first)  # exits without saying goodbye: the scrape notices
    text = collected(tmp_path)
    assert value(text, "emotions_model_version", worker="host:1") is None
    assert value(text, "emotions_worker_device_info", worker="host:1", device="cuda:0") is None
    assert value(text, "emotions_worker_device_info", worker="host:2", device="cuda:1") == 1
    assert value(text, "emotions_model_version", worker="host:2") == 3
    assert value(text, "emotions_images_failed_total") == 2  # counters outlive processes
    finish(second)


def test_helpers_never_raise_and_ignore_empty_batches() -> None:
    from face_emotions.ops import inference_metrics as metrics

    metrics.observe_forward(0.1, 0)
    metrics.count_images(processed=0, failed=0, model_version=None)
    metrics.set_model_version("x:1", None)
    metrics.record_batch(processed=1, failed=0, model_version=None)
    text = collected_default()
    assert value(text, "emotions_images_processed_total", model_version="none") >= 1


def collected_default() -> str:
    from prometheus_client import REGISTRY
    from prometheus_client.exposition import generate_latest

    return generate_latest(REGISTRY).decode()


def test_prepare_empties_a_configured_directory(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, "unset-by-the-test")
    (tmp_path / "counter_1.db").write_bytes(b"old")
    (tmp_path / "keep.txt").write_text("not ours")
    assert prepare_multiprocess_dir(tmp_path) == tmp_path.resolve()
    assert os.environ[ENV] == str(tmp_path.resolve())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_worker_serves_its_pool_processes_metrics(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv(ENV, "inherited")  # an inherited directory is never used
    monkeypatch.setattr("worker.metrics_server.multiprocess_mode_active", lambda: True)
    directory = tmp_path / "metrics"
    port = free_port()
    metrics = WorkerMetrics(
        Settings(var_dir=tmp_path, worker_metrics_dir=directory, worker_metrics_port=port)
    )
    assert metrics.prepare() == directory.resolve()
    assert os.environ[ENV] == str(directory.resolve())
    child = pool_process(directory, "host:7")
    try:
        assert metrics.serve() == port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            text = reply.read().decode()
        assert value(text, "emotions_images_processed_total", model_version="2") == 3
        assert value(text, "emotions_model_version", worker="host:7") == 3
        metrics.process_exited(child.pid)  # worker_process_shutdown
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
            assert "host:7" not in reply.read().decode()
    finally:
        finish(child)
        metrics.stop()
    assert directory.exists()  # a configured directory stays; a temporary one goes


def test_worker_metrics_port_zero_or_taken(tmp_path: Path) -> None:
    assert WorkerMetrics(Settings(var_dir=tmp_path, worker_metrics_port=0)).serve() is None
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = WorkerMetrics(Settings(var_dir=tmp_path, worker_metrics_port=port))
        assert busy.serve() is None  # logged; the worker runs on


# -- logs ------------------------------------------------------------------------------------


def test_json_lines_carry_the_job_context() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(json_formatter())
    logger = logging.getLogger("tests.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    job_id = uuid.uuid4()
    try:
        logger.info("job %s queued", job_id, extra=job_context(job_id, model_version=3))
        JobLogger(logger, job_id, worker="host:1").warning("chunk %d", 2, extra={"images": 4})
    finally:
        logger.removeHandler(handler)
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first["message"] == f"job {job_id} queued"
    assert first["level"] == "INFO" and first["logger"] == "tests.json"
    assert first["job_id"] == str(job_id) and first["model_version"] == 3
    assert datetime.fromisoformat(first["timestamp"]).tzinfo is not None
    assert "worker" not in first  # None values are left out
    assert second["level"] == "WARNING" and second["message"] == "chunk 2"
    assert (second["job_id"], second["worker"], second["images"]) == (str(job_id), "host:1", 4)


def test_configure_logging_installs_one_handler_and_the_level(tmp_path: Path) -> None:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        configure_logging(Settings(var_dir=tmp_path, log_format="json", log_level="warning"))
        configure_logging(Settings(var_dir=tmp_path, log_format="json", log_level="warning"))
        ours = [h for h in root.handlers if h not in handlers]
        assert len(ours) == 1
        assert root.level == logging.WARNING
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "boom", None, None)
        assert json.loads(ours[0].format(record))["message"] == "boom"
        # Celery's --loglevel applies unless EMOTIONS_LOG_LEVEL was set.
        configure_logging(Settings(var_dir=tmp_path), level="DEBUG")
        assert root.level == logging.DEBUG
    finally:
        for handler in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(handler)
        root.setLevel(level)


def test_celery_handlers_get_the_json_format(tmp_path: Path) -> None:
    logger = logging.getLogger("tests.celery-like")
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("[%(levelname)s] %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    try:
        apply_format(logger, Settings(var_dir=tmp_path, log_format="text"), level="INFO")
        logger.info("text stays text")
        apply_format(logger, Settings(var_dir=tmp_path, log_format="json"), level="INFO")
        logger.info("now json", extra=job_context("j1", model_version=2, worker="w:1"))
    finally:
        logger.removeHandler(handler)
    text_line, json_line = stream.getvalue().splitlines()
    assert text_line == "[INFO] text stays text"
    assert json.loads(json_line)["job_id"] == "j1"


def test_job_submission_logs_its_job_id(client, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="api.jobs"):
        job_id = upload(client, ["a.png"]).get_json()["id"]
    records = [r for r in caplog.records if getattr(r, "job_id", None) == job_id]
    assert records and records[0].name == "api.jobs"
