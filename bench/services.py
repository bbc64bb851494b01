"""The real serving path for the process-level figures: gunicorn API, Celery workers, Redis.

Started by ``scripts/launcher.py``, as ``make demo`` and the integration tests start them
(compose's command lines, background processes in their own sessions, logs in files, and
here tied to the benchmark's life), against a Redis database number of our own and a SQLite
file in a temp directory, so the figures measure what a user's job goes through: REST submit,
the database, the broker, the worker's task, the result writes, and the status the client
polls.

Which workers consume the queue is switched with Celery's remote control
(``cancel_consumer`` / ``add_consumer``) rather than by restarting them, so A/B runs can be
interleaved without paying a worker start and model load per repetition.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterable
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from bench.cpu_use import CpuUse
from scripts.launcher import Launcher
from scripts.launcher import ServiceError
from scripts.launcher import ServiceProcess
from scripts.launcher import free_port
from scripts.launcher import wait_ready

ROOT = Path(__file__).resolve().parents[1]
REDIS_HOST = os.environ.get("BENCH_REDIS_HOST", "127.0.0.1")
REDIS_PORT = int(os.environ.get("BENCH_REDIS_PORT", "6379"))
CLAIM_KEY = "face-emotions-bench-claim"
QUEUE = "inference"
TERMINAL = {"succeeded", "completed_with_errors", "failed", "cancelled"}
#: How often a job's status is polled: the issue's 0.1 s (the cost is reported).
#: A job is followed as the CLI follows it: status requests that wait in the API for its end
#: (``GET /api/v1/jobs/<id>?wait=``, answered within 0.05 s of the end), not a polling loop.
WAIT_SECONDS = 30.0
#: EMOTIONS_* knobs of the benchmark's own environment that are handed on to the services,
#: so ``EMOTIONS_BACKEND=torch python -m bench.run`` benchmarks that configuration. Anything
#: else (database, broker, storage, tokens) is the benchmark's own and never inherited.
PASSED_ON = (
    "EMOTIONS_BACKEND",
    "EMOTIONS_PRECISION",
    "EMOTIONS_TORCH_COMPILE",
    "EMOTIONS_DECODE_THREADS",
    "EMOTIONS_CHUNK_BATCHES",
    "EMOTIONS_MAX_BATCH_DELAY_MS",
    "EMOTIONS_FACE_MIN_SCORE",
    "EMOTIONS_FACE_MIN_SIZE",
    "EMOTIONS_FACE_DETECT_MAX_SIDE",
)


def redis_client(db: int = 0) -> Any:
    import redis

    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=db, socket_timeout=5)


def claim_redis_db() -> tuple[str, int]:
    """An empty Redis database number (1-15), claimed with SET NX like the test fixtures do.

    Integration tests of other engineers run on the same Redis at the same time; an empty
    number claimed atomically is ours alone, and FLUSHDB at the end gives it back empty.
    """
    try:
        redis_client().ping()
    except Exception as exc:
        raise ServiceError(f"Redis at {REDIS_HOST}:{REDIS_PORT} is not reachable: {exc}") from exc
    start = os.getpid() % 15
    for offset in range(15):
        db = (start + offset) % 15 + 1
        client = redis_client(db)
        if client.dbsize() == 0 and client.set(CLAIM_KEY, os.getpid(), nx=True):
            return f"redis://{REDIS_HOST}:{REDIS_PORT}/{db}", db
    raise ServiceError("no empty Redis database number (1-15) is free")


def release_redis_db(db: int) -> None:
    with contextlib.suppress(Exception):
        redis_client(db).flushdb()


@dataclass
class Environment:
    """Everything the API and the workers share: one temp var dir, one DB, one broker DB."""

    var_dir: Path
    data_root: Path
    database_url: str
    broker_url: str
    tracking_uri: str
    device: str
    logs: Path

    def env(self, **overrides: str) -> dict[str, str]:
        base = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("EMOTIONS_", "MALLOC_")) and k != "MLFLOW_TRACKING_URI"
        }
        base.update({k: os.environ[k] for k in PASSED_ON if k in os.environ})
        base.update(
            {
                "EMOTIONS_VAR_DIR": str(self.var_dir),
                "EMOTIONS_DATABASE_URL": self.database_url,
                "EMOTIONS_BROKER_URL": self.broker_url,
                "EMOTIONS_DATA_ROOT": str(self.data_root),
                "EMOTIONS_MLFLOW_TRACKING_URI": self.tracking_uri,
                "EMOTIONS_DEVICE": self.device,
                # Another engineer is adding token auth; "disabled" lets every request in.
                "EMOTIONS_AUTH": "disabled",
                # 200 concurrent submissions must not be throttled by the per-token limit.
                "EMOTIONS_SUBMIT_RATE_LIMIT": "100000/minute",
                "EMOTIONS_MODEL_REFRESH_SECONDS": "3600",
                # What make demo and compose set: the worker tunes malloc itself, but the API
                # and any other process get the same allocator.
                "MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": "68719476736",
                "MALLOC_ARENA_MAX": "1",
                "PYTHONUNBUFFERED": "1",
            }
        )
        base.update(overrides)
        return base

    def launcher(self) -> Launcher:
        """The services die with the benchmark (a CI timeout kills it without cleanup)."""
        return Launcher(self.env(), self.logs, cwd=ROOT, die_with_parent=True)


@dataclass
class Worker:
    """A ``celery worker`` consuming queue ``inference``; ``node`` is its remote-control name."""

    process: ServiceProcess
    node: str
    threads: int
    pool: str
    concurrency: int

    def rss(self) -> tuple[int, int]:
        """Resident bytes of (the main process, its children): a worker's main and pool
        processes.

        RSS counts pages shared after the fork in both, so the sum overstates what the worker
        holds; each part on its own is what grows or not.
        """
        import psutil

        try:
            root = psutil.Process(self.process.pid)
            main = root.memory_info().rss
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0, 0
        total = 0
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                total += child.memory_info().rss
        return main, total


def serving_backend(worker: Worker, workers: list[dict[str, Any]]) -> str | None:
    """The backend ``worker``'s processes report serving (``GET /api/v1/models`` rows are
    ``host:pid``, one per process), or None when none of them has reported one yet."""
    import psutil

    try:
        root = psutil.Process(worker.process.pid)
        pids = {root.pid, *(child.pid for child in root.children(recursive=True))}
    except psutil.NoSuchProcess:
        return None
    for row in workers:
        pid = row["name"].rsplit(":", 1)[-1]
        if pid.isdigit() and int(pid) in pids and row.get("backend"):
            return str(row["backend"])
    return None


@dataclass
class JobRun:
    """One job from submit to finished, as the client saw it, plus the API's own timestamps."""

    job_id: str
    images: int
    seconds: float
    job: dict[str, Any]
    #: Who used the CPU while it ran (filled by the figures that ask, see bench.cpu_use).
    cpu: CpuUse | None = None

    def breakdown(self) -> dict[str, Any]:
        """Where the wall time went: waiting in the queue vs classifying (API timestamps)."""
        from datetime import datetime

        def parse(key: str) -> datetime | None:
            value = self.job.get(key)
            return datetime.fromisoformat(value) if value else None

        created, started, finished = parse("created_at"), parse("started_at"), parse("finished_at")
        out: dict[str, Any] = {"wall_seconds": round(self.seconds, 3)}
        if created and started:
            out["queued_seconds"] = round((started - created).total_seconds(), 3)
        if started and finished:
            out["running_seconds"] = round((finished - started).total_seconds(), 3)
        return out


@dataclass
class Cluster:
    """The API plus named workers; :meth:`consume` decides which workers take jobs."""

    environment: Environment
    api: ServiceProcess | None = None
    api_url: str = ""
    workers: dict[str, Worker] = field(default_factory=dict)
    consuming: set[str] = field(default_factory=set)
    _control: Any = None
    last_submit_seconds: float = 0.0  # how long the last run_many took to submit its jobs

    # -- processes -----------------------------------------------------------------------

    def start_api(self) -> None:
        port = free_port()
        self.api_url = f"http://127.0.0.1:{port}"
        # As compose serves it: gevent workers take the tiny-jobs figure's 16 client threads.
        self.api = self.environment.launcher().api(
            port=port, env={"EMOTIONS_API_URL": self.api_url}
        )

    def start_worker(
        self,
        name: str,
        *,
        threads: int,
        pool: str = "prefork",
        concurrency: int = 1,
        **env: str,
    ) -> Worker:
        node = f"{name}@{socket.gethostname()}"
        process = self.environment.launcher().worker(
            f"worker-{name}",
            node=node,
            queue=QUEUE,
            pool=pool,
            concurrency=concurrency,
            env={"EMOTIONS_TORCH_THREADS": str(threads), **env},
        )
        worker = Worker(process, node, threads, pool, concurrency)
        self.workers[name] = worker
        self.consuming.add(name)
        return worker

    def wait_ready(self, timeout: float = 180) -> None:
        """Wait for the API's /readyz and every worker's ``ready.`` line (all at once)."""
        processes = [w.process for w in self.workers.values()]
        wait_ready([self.api, *processes] if self.api else processes, timeout)

    def stop(self) -> None:
        if self._control is not None:
            with contextlib.suppress(Exception):
                self._control.close()
        for worker in self.workers.values():
            worker.process.stop()
        if self.api is not None:
            self.api.stop()

    # -- which workers consume -----------------------------------------------------------

    def control(self) -> Any:
        if self._control is None:
            from celery import Celery

            self._control = Celery("bench-control", broker=self.environment.broker_url)
        return self._control

    def consume(self, names: Iterable[str]) -> None:
        """Make exactly ``names`` consume the queue (idle workers only: between jobs)."""
        wanted = set(names)
        unknown = wanted - set(self.workers)
        if unknown:
            raise ValueError(f"unknown workers {sorted(unknown)}")
        control = self.control().control
        for name in sorted(self.consuming - wanted):
            self._ask(control.cancel_consumer, name)
            self.consuming.discard(name)
        for name in sorted(wanted - self.consuming):
            self._ask(control.add_consumer, name)
            self.consuming.add(name)

    def tasks_done(self, name: str) -> int:
        """Tasks the worker has run since it started (Celery's remote ``stats``)."""
        node = self.workers[name].node
        stats = self.control().control.inspect(destination=[node], timeout=5).stats() or {}
        return int(sum((stats.get(node) or {}).get("total", {}).values()))

    def _ask(self, command: Any, name: str) -> None:
        node = self.workers[name].node
        for _attempt in range(5):
            replies = command(QUEUE, destination=[node], reply=True, timeout=5) or []
            if any(node in reply for reply in replies):
                return
        raise ServiceError(f"worker {node} did not answer {command.__name__}")

    # -- jobs ----------------------------------------------------------------------------

    def client(self) -> Any:
        from face_emotions.cli.api_client import EmotionsClient

        return EmotionsClient(self.api_url, timeout=120)

    def run_job(
        self,
        folder: str,
        *,
        batch_size: int | None = None,
        faces: str = "none",
        timeout: float = 1800,
    ) -> JobRun:
        """Submit a folder job and wait until it is finished: the user's wall time.

        ``faces`` is the job's face policy: ``none`` by default, because the figures that
        compare a job with the in-process loops measure classification; the ``detection``
        figure asks for ``all`` (the deployment default) and compares it with ``none``.
        """
        client = self.client()
        started = time.perf_counter()
        job = client.submit_folder(folder, batch_size=batch_size, faces=faces)
        deadline = time.monotonic() + timeout
        while job["status"] not in TERMINAL:
            if time.monotonic() > deadline:
                raise ServiceError(f"job {job['id']} still {job['status']} after {timeout}s")
            job = client.job(job["id"], wait=WAIT_SECONDS)
        seconds = time.perf_counter() - started
        if job["status"] != "succeeded" or job["done"] != job["total"]:
            raise ServiceError(f"job {job['id']} ended {job['status']}: {job}\n{self.logs()}")
        return JobRun(job["id"], job["total"], seconds, job)

    def poll_seconds(self, job_id: str, requests: int = 30) -> float:
        """Median time the API takes to answer one status poll of a finished job."""
        import statistics

        client = self.client()
        times = []
        for _ in range(requests):
            started = time.perf_counter()
            client.job(job_id)
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def run_many(
        self, folders: list[str], *, submitters: int = 16, timeout: float = 1800
    ) -> tuple[float, list[dict[str, Any]]]:
        """Submit one job per folder from a pool of concurrent clients; time until all finish.

        Completion is read from one list request per poll instead of one request per job, so
        polling 200 jobs does not load the 2-core machine more than the jobs themselves.
        """
        local = threading.local()

        def submit(folder: str) -> str:
            if not hasattr(local, "client"):
                local.client = self.client()
            return str(local.client.submit_folder(folder, faces="none")["id"])

        client = self.client()
        started = time.perf_counter()
        with ThreadPoolExecutor(submitters, thread_name_prefix="submit") as pool:
            ids = set(pool.map(submit, folders))
        self.last_submit_seconds = time.perf_counter() - started
        deadline = time.monotonic() + timeout
        # Newest first, so the page of our jobs' size holds them all unless someone else
        # submitted meanwhile: then read a whole page. A short page keeps the observer cheap
        # (listing every job of earlier rounds each poll would load the cores being measured).
        limit = len(ids)
        while True:
            body = client.http.get(
                f"{self.api_url}/api/v1/jobs", params={"limit": limit}, timeout=60
            ).json()
            ours = [job for job in body["items"] if job["id"] in ids]
            if len(ours) < len(ids) and limit < 1000:
                limit = 1000
                continue
            if len(ours) == len(ids) and all(job["status"] in TERMINAL for job in ours):
                break
            if time.monotonic() > deadline:
                raise ServiceError(f"{len(ids)} jobs not finished after {timeout}s")
            time.sleep(0.2)
        seconds = time.perf_counter() - started
        bad = [job for job in ours if job["status"] != "succeeded"]
        if bad:
            raise ServiceError(f"{len(bad)} of {len(ids)} tiny jobs failed: {bad[:2]}")
        return seconds, ours

    def logs(self) -> str:
        processes = [w.process for w in self.workers.values()]
        parts = [p.log_tail(1500) for p in ([self.api] if self.api else []) + processes]
        return "\n".join(part for part in parts if part)


@contextlib.contextmanager
def running(environment: Environment) -> Iterator[Cluster]:
    cluster = Cluster(environment)
    try:
        yield cluster
    finally:
        cluster.stop()
