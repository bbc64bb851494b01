"""Real services for integration tests: the machine's Redis and PostgreSQL, Celery worker
processes, an MLflow store with published model versions.

Each test run gets its own Redis database number and its own PostgreSQL database (created and
dropped here), so runs never see each other's queues or rows.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path

import pytest

from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.bundle import save_bundle
from face_emotions.modeling.zoo import create_model
from face_emotions.registry.mlflow_registry import Registry
from face_emotions.settings import Settings
from scripts.launcher import Launcher
from scripts.launcher import ServiceProcess
from scripts.launcher import free_port

REDIS_HOST = os.environ.get("TEST_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("TEST_REDIS_PORT", "6379"))
PG_DSN = os.environ.get("TEST_PG_DSN", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")
PG_URL = os.environ.get("TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432")
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def gunicorn(env: dict[str, str], log_path: Path, *options: str) -> Iterator[str]:
    """A real gunicorn serving ``api.wsgi:app`` as compose runs it, plus ``options`` (workers,
    threads, ...); yields its URL once ``/healthz`` answers, terminates it afterwards."""
    launcher = Launcher(env, log_path.parent, cwd=ROOT, append_logs=False)
    server = launcher.api(*options, port=free_port(), ready_path="/healthz", log_path=log_path)
    try:
        server.wait_ready(60)
        assert server.url is not None
        yield server.url
    finally:
        server.stop(15)


def _redis_client(db: int = 0):
    import redis

    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=5)


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    """An empty Redis database number, flushed again at the end."""
    try:
        _redis_client().ping()
    except Exception as exc:
        pytest.skip(f"Redis at {REDIS_HOST}:{REDIS_PORT} is not reachable: {exc}")
    start = os.getpid() % 14 + 1
    for offset in range(15):
        db = (start + offset - 1) % 15 + 1
        client = _redis_client(db)
        # SET NX claims the number for this run even if a concurrent run probes it too.
        if client.dbsize() == 0 and client.set("face-emotions-test-claim", os.getpid(), nx=True):
            break
    else:
        pytest.skip("no empty Redis database number (1-15) is free")
    yield f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}"
    client.flushdb()


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this run, dropped afterwards."""
    import psycopg

    name = f"fe_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_DSN, autocommit=True, connect_timeout=5)
    except Exception as exc:
        pytest.skip(f"PostgreSQL is not reachable ({PG_DSN}): {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    yield f"{PG_URL}/{name}"
    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(scope="session")
def model_store(tmp_path_factory: pytest.TempPathFactory) -> ModelStore:
    """An MLflow store with two published versions of a tiny cnn; v1 is champion.

    Serving tests exercise the machinery (queues, batching, reload), not accuracy, so random
    weights do; training is covered by test_training.py.
    """
    var_dir = tmp_path_factory.mktemp("serving-var")
    settings = Settings(var_dir=var_dir)
    registry = Registry(settings)
    spec = ModelSpec.for_architecture("cnn", 32, options={"width": 8})
    versions = []
    for seed in (1, 2):
        import torch

        torch.manual_seed(seed)
        bundle_dir = save_bundle(
            var_dir / f"bundle-{seed}", create_model("cnn", width=8).eval(), spec
        )
        run = registry.client.create_run(registry.experiment_id())
        version = registry.publish(
            bundle_dir,
            run_id=run.info.run_id,
            tags={"accuracy": 0.5, "weighted_f1": 0.5, "architecture": "cnn", "image_size": 32},
        )
        versions.append(version.version)
    registry.set_alias(versions[0])
    return ModelStore(var_dir, registry.tracking_uri, versions)


@dataclass
class ModelStore:
    var_dir: Path
    tracking_uri: str
    versions: list[int]

    def registry(self) -> Registry:
        return Registry(Settings(var_dir=self.var_dir, mlflow_tracking_uri=self.tracking_uri))


@dataclass
class Services:
    """Environment shared by the API (in-process) and worker processes of one test."""

    database_url: str
    broker_url: str
    var_dir: Path
    data_root: Path
    tracking_uri: str
    extra_env: dict[str, str] = field(default_factory=dict)

    def env(self, **overrides: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")}
        env.update(
            {
                "EMOTIONS_DATABASE_URL": self.database_url,
                "EMOTIONS_BROKER_URL": self.broker_url,
                "EMOTIONS_VAR_DIR": str(self.var_dir),
                "EMOTIONS_DATA_ROOT": str(self.data_root),
                "EMOTIONS_MLFLOW_TRACKING_URI": self.tracking_uri,
                "EMOTIONS_MODEL_REFRESH_SECONDS": "1",
                "EMOTIONS_TORCH_THREADS": "1",
                "EMOTIONS_DEVICE": "cpu",
                # Serving tests exercise jobs, not tokens: test_security.py turns auth on.
                "EMOTIONS_AUTH": "disabled",
                # Workers of parallel tests must not fight over one port: a test that scrapes
                # a worker gives it a free one.
                "EMOTIONS_WORKER_METRICS_PORT": "0",
                **self.extra_env,
                **overrides,
            }
        )
        return env

    def settings(self, **overrides) -> Settings:
        values = {
            "database_url": self.database_url,
            "broker_url": self.broker_url,
            "var_dir": self.var_dir,
            "data_root": self.data_root,
            "mlflow_tracking_uri": self.tracking_uri,
            "auth": "disabled",  # as in env(): only the security tests authenticate
            **overrides,
        }
        return Settings(**values)


@pytest.fixture(params=["postgresql", "sqlite"])
def services(
    request: pytest.FixtureRequest,
    redis_url: str,
    postgres_url: str,
    model_store: ModelStore,
    tmp_path: Path,
) -> Iterator[Services]:
    """One test's services; parametrised over PostgreSQL and the embedded SQLite."""
    from sqlalchemy import create_engine
    from sqlalchemy import text

    from face_emotions.jobs.migrate import upgrade

    if request.param == "postgresql":
        database_url = postgres_url
    else:
        database_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(database_url)
    data_root = tmp_path / "data"
    data_root.mkdir()
    _redis_client(int(redis_url.rsplit("/", 1)[1])).delete(
        "inference", "_kombu.binding.inference", "training", "_kombu.binding.training"
    )
    yield Services(
        database_url, redis_url, model_store.var_dir, data_root, model_store.tracking_uri
    )
    if request.param == "postgresql":
        engine = create_engine(database_url)
        with engine.begin() as connection:
            connection.execute(
                text("TRUNCATE jobs, images, results, workers, training_runs CASCADE")
            )
        engine.dispose()


class WorkerProcess:
    """A real ``celery worker`` process, started by the launcher; killed (or terminated) by
    the fixture.

    By default an inference worker (prefork, one pool process); ``app="training.service",
    queue="training"`` makes it a trainer, ``pool="threads", concurrency=N`` a threads-pool
    worker running N tasks at once. ``process`` is its ``Popen`` (pid, poll).
    """

    def __init__(
        self,
        services: Services,
        name: str,
        log_dir: Path,
        *,
        app: str = "worker.app",
        queue: str = "inference",
        pool: str = "prefork",
        concurrency: int = 1,
        **env: str,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"worker-{name}.log"
        launcher = Launcher(services.env(**env), log_dir, cwd=ROOT, append_logs=False)
        self.service: ServiceProcess = launcher.worker(
            f"worker-{name}",
            node=f"{name}@%h",
            app=app,
            queue=queue,
            pool=pool,
            concurrency=concurrency,
            log_path=self.log_path,
        )
        assert self.service.popen is not None
        self.process: subprocess.Popen[bytes] = self.service.popen

    def wait_ready(self, timeout: float = 60) -> None:
        """Until its ``ready.`` line; RuntimeError if it exits, TimeoutError after timeout."""
        self.service.wait_ready(timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def pool_pids(self) -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process(self.process.pid).children(recursive=True)]

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """``sig`` to the whole process group, SIGKILL if it is still there after 15 s."""
        self.service.stop(15, sig)


@pytest.fixture
def start_worker(services: Services, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    workers: list[WorkerProcess] = []

    def start(
        name: str | None = None,
        *,
        wait: bool = True,
        app: str = "worker.app",
        queue: str = "inference",
        pool: str = "prefork",
        concurrency: int = 1,
        **env: str,
    ) -> WorkerProcess:
        worker = WorkerProcess(
            services,
            name or f"w{len(workers) + 1}",
            tmp_path,
            app=app,
            queue=queue,
            pool=pool,
            concurrency=concurrency,
            **env,
        )
        workers.append(worker)
        if wait:
            worker.wait_ready()
        return worker

    yield start
    for worker in workers:
        worker.kill(signal.SIGTERM)


@pytest.fixture
def api(services: Services):
    """The Flask app with the real Celery queue, served through Flask's test client."""
    from api.app import create_app

    app = create_app(services.settings())
    app.config["TESTING"] = True
    return app.test_client()


def wait_for_job(client, job_id: str, *, timeout: float = 120, poll: float = 0.3) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = client.get(f"/api/v1/jobs/{job_id}").get_json()
        if body["status"] in {"succeeded", "completed_with_errors", "failed", "cancelled"}:
            return body
        time.sleep(poll)
    raise TimeoutError(f"job {job_id} did not finish in {timeout}s: {body}")
