"""Cluster-wide figures for Prometheus, read from the jobs database and the broker at scrape
time, so that any one API process reports the same numbers for every worker on every host.

One scrape costs two small queries (a ``GROUP BY status`` over the jobs table, which holds the
per-job image counters, and the recently seen workers) and one Redis round trip (``LLEN`` of
each queue's lists). A database or broker that is down leaves its metrics out of that scrape
(logged, and ``emotions_dependency_up`` says 0): ``/metrics`` itself keeps answering.

Names differ from the workers' own counters (``emotions_images_processed_total``) on purpose:
these count every worker's results, those count one worker process's.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from typing import Any

from prometheus_client.core import CounterMetricFamily
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.core import Metric
from prometheus_client.registry import Collector
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs.schema import Job
from face_emotions.jobs.schema import JobStatus
from face_emotions.jobs.schema import WorkerState
from face_emotions.jobs.worker_heartbeats import INFERENCE
from face_emotions.jobs.worker_heartbeats import LIVENESS_SECONDS

log = logging.getLogger(__name__)

#: kombu's Redis transport keeps priority ``p > 0`` messages of ``queue`` in a list named
#: ``queue + SEP + p`` (priority steps 0, 3, 6, 9; step 0 is the plain name).
KOMBU_PRIORITY_SEP = "\x06\x16"
KOMBU_PRIORITY_STEPS = (0, 3, 6, 9)
REDIS_TIMEOUT_SECONDS = 1.0
DEFAULT_WORKER_LIVENESS = timedelta(seconds=LIVENESS_SECONDS)


def queue_keys(queue: str) -> list[str]:
    """The Redis lists that hold the messages waiting in ``queue``."""
    return [queue if p == 0 else f"{queue}{KOMBU_PRIORITY_SEP}{p}" for p in KOMBU_PRIORITY_STEPS]


def queue_lengths(client: Any, queues: Sequence[str]) -> dict[str, int]:
    """Messages waiting in each queue (tasks being worked on are not waiting), one round trip."""
    pipe = client.pipeline(transaction=False)
    for queue in queues:
        for key in queue_keys(queue):
            pipe.llen(key)
    sizes = iter(pipe.execute())
    return {queue: sum(int(next(sizes)) for _ in KOMBU_PRIORITY_STEPS) for queue in queues}


def redis_url_of(broker_url: str) -> str | None:
    """A redis-py URL for a Celery broker URL, ``None`` when the broker is not Redis."""
    if broker_url.startswith(("redis://", "rediss://", "unix://")):
        return broker_url
    if broker_url.startswith("redis+socket://"):  # Celery's spelling of a Unix socket
        return "unix://" + broker_url.removeprefix("redis+socket://")
    return None


class ClusterCollector(Collector):
    """Jobs by status, images processed and failed, queue depths, live workers' versions."""

    def __init__(
        self,
        sessions: Callable[[], sessionmaker[Session]],
        *,
        broker_url: str,
        queues: Sequence[str],
        worker_liveness: timedelta = DEFAULT_WORKER_LIVENESS,
    ) -> None:
        self._sessions = sessions
        self.queues = list(queues)
        self.worker_liveness = worker_liveness
        self._redis_url = redis_url_of(broker_url)
        self._redis: Any = None
        self._lock = threading.Lock()
        self._failing: set[str] = set()

    def describe(self) -> Iterable[Metric]:
        return []  # names are checked by nobody; collecting at registration would query

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "emotions_dependency_up",
            "Whether this scrape could read the dependency (1) or left its metrics out (0).",
            labels=["dependency"],
        )
        database = self._guarded("database", self._database)
        up.add_metric(["database"], 0 if database is None else 1)
        yield from database or []
        if self._redis_url is not None:
            broker = self._guarded("broker", self._broker)
            up.add_metric(["broker"], 0 if broker is None else 1)
            yield from broker or []
        yield up

    def _guarded(self, name: str, read: Callable[[], list[Metric]]) -> list[Metric] | None:
        try:
            metrics = read()
        except Exception as exc:
            level = logging.DEBUG if name in self._failing else logging.WARNING
            self._failing.add(name)
            log.log(level, "metrics: %s unreadable, its metrics are left out: %s", name, exc)
            return None
        if name in self._failing:
            self._failing.discard(name)
            log.info("metrics: %s readable again", name)
        return metrics

    def _database(self) -> list[Metric]:
        since = datetime.now(UTC) - self.worker_liveness
        with self._sessions()() as session:
            by_status = session.execute(
                select(
                    Job.status,
                    func.count(),
                    func.coalesce(func.sum(Job.total), 0),
                    func.coalesce(func.sum(Job.done), 0),
                    func.coalesce(func.sum(Job.failed), 0),
                ).group_by(Job.status)
            ).all()
            workers = session.execute(
                select(WorkerState.name, WorkerState.model_version).where(
                    WorkerState.last_seen >= since, WorkerState.role == INFERENCE
                )
            ).all()
        jobs = GaugeMetricFamily("emotions_jobs", "Jobs by status.", labels=["status"])
        counts = {status.value: 0 for status in JobStatus}
        submitted = processed = failed = pending = 0
        for status, count, total, done, errors in by_status:
            counts[status] = counts.get(status, 0) + int(count)
            submitted, processed, failed = (
                submitted + int(total),
                processed + int(done),
                failed + int(errors),
            )
            if status in (JobStatus.QUEUED, JobStatus.RUNNING):
                pending += max(int(total) - int(done) - int(errors), 0)
        for status, count in counts.items():
            jobs.add_metric([status], count)
        versions = GaugeMetricFamily(
            "emotions_worker_model_version",
            "Model version each worker process serves, from its heartbeat (seen recently).",
            labels=["worker"],
        )
        for name, version in workers:
            if version is not None:
                versions.add_metric([name], version)
        return [
            jobs,
            CounterMetricFamily(
                "emotions_job_images_submitted",
                "Images in all jobs (every worker, every host).",
                value=submitted,
            ),
            CounterMetricFamily(
                "emotions_job_images_processed",
                "Images of all jobs given a prediction (every worker, every host).",
                value=processed,
            ),
            CounterMetricFamily(
                "emotions_job_images_failed",
                "Images of all jobs given a per-image error (every worker, every host).",
                value=failed,
            ),
            GaugeMetricFamily(
                "emotions_job_images_pending",
                "Images of queued and running jobs without a result yet (the back-pressure "
                "backlog).",
                value=pending,
            ),
            GaugeMetricFamily(
                "emotions_workers",
                "Worker processes seen in the freshness window.",
                value=len(workers),
            ),
            versions,
        ]

    def _broker(self) -> list[Metric]:
        lengths = queue_lengths(self._client(), self.queues)
        depth = GaugeMetricFamily(
            "emotions_queue_length", "Tasks waiting in a broker queue.", labels=["queue"]
        )
        for queue, length in lengths.items():
            depth.add_metric([queue], length)
        return [depth]

    def _client(self) -> Any:
        with self._lock:
            if self._redis is None:
                if self._redis_url is None:  # collect() reads the broker only with a URL
                    raise RuntimeError("the broker is not Redis: no queue lengths to read")
                import redis

                self._redis = redis.Redis.from_url(
                    self._redis_url,
                    socket_connect_timeout=REDIS_TIMEOUT_SECONDS,
                    socket_timeout=REDIS_TIMEOUT_SECONDS,
                )
            return self._redis
