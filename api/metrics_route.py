"""``GET /metrics``: Prometheus exposition (text format 0.0.4) of the API and of the cluster.

Two kinds of figures:

- this API's requests, by route (the URL rule, such as ``/api/v1/jobs/<uuid:job_id>``, never the
  raw path, so ids don't multiply the series), method and status, counted by request hooks;
- cluster-wide figures read from the database and the broker at scrape time
  (:class:`~api.cluster_metrics.ClusterCollector`): jobs by status, images
  processed and failed, queue depths, workers' model versions.

Gunicorn runs several worker processes. When ``PROMETHEUS_MULTIPROC_DIR`` is set (an empty
directory per API instance, in the environment before gunicorn starts), prometheus-client runs
in multiprocess mode and any process answers with the sum over all of them; without it each
process counts its own requests (the cluster figures are right either way).

``/metrics`` is public like the probes (no token, no rate limit) and left out of the OpenAPI
document.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from datetime import timedelta

from apiflask import APIFlask
from flask import Response
from flask import g
from flask import request
from prometheus_client import CollectorRegistry
from prometheus_client import Counter
from prometheus_client import Histogram
from prometheus_client import ProcessCollector
from prometheus_client.core import Metric
from prometheus_client.exposition import generate_latest

from api.cluster_metrics import ClusterCollector
from api.extensions import services
from face_emotions.jobs.protocol import INFERENCE_QUEUE
from face_emotions.ops.prometheus_multiprocess import ENV
from face_emotions.ops.prometheus_multiprocess import multiprocess_registry
from face_emotions.settings import Settings

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
PATH = "/metrics"
#: Label of requests that matched no route (404, and 405 for an unknown method).
UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Seconds, from a probe (milliseconds) to a large upload (minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

_KEY = "face_emotions_metrics"
_STARTED = "_metrics_started"

# registry=None: exposed through the per-app registry below (several apps live in one test
# process, and in multiprocess mode the values come from the files anyway).
REQUESTS = Counter(
    "emotions_api_requests",
    "API requests by route (URL rule), method and status.",
    ["route", "method", "status"],
    registry=None,
)
REQUEST_SECONDS = Histogram(
    "emotions_api_request_seconds",
    "API request duration in seconds by route (URL rule) and method.",
    ["route", "method"],
    buckets=LATENCY_BUCKETS,
    registry=None,
)


class _RequestMetrics:
    """The request metrics of this process (single-process mode)."""

    def collect(self) -> Iterator[Metric]:
        yield from REQUESTS.collect()
        yield from REQUEST_SECONDS.collect()


def init_app(app: APIFlask, settings: Settings) -> CollectorRegistry:
    """Request hooks, the ``/metrics`` route and this app's registry."""
    registry = _registry()
    registry.register(
        ClusterCollector(
            lambda: services().sessions,
            broker_url=settings.broker_url,
            queues=[INFERENCE_QUEUE, settings.training_queue],
            worker_liveness=timedelta(seconds=settings.worker_stale_seconds),
        )
    )
    app.extensions[_KEY] = registry
    # First of the before-request hooks, so that time spent in the others counts too.
    app.before_request_funcs.setdefault(None, []).insert(0, _start_timer)
    app.after_request(_count_request)

    @app.get(PATH)
    @app.doc(hide=True)
    def metrics() -> Response:
        return Response(generate_latest(registry), mimetype=None, content_type=CONTENT_TYPE)

    return registry


def _registry() -> CollectorRegistry:
    directory = os.environ.get(ENV)
    if directory:
        os.makedirs(directory, exist_ok=True)
        log.info("metrics: multiprocess mode, samples in %s", directory)
        return multiprocess_registry(directory)
    registry = CollectorRegistry()
    registry.register(_RequestMetrics())
    ProcessCollector(registry=registry)
    return registry


def _start_timer() -> None:
    setattr(g, _STARTED, time.perf_counter())


def _count_request(response: Response) -> Response:
    try:
        route = request.url_rule.rule if request.url_rule is not None else UNMATCHED
        method = request.method if request.method in METHODS else "OTHER"
        REQUESTS.labels(route=route, method=method, status=str(response.status_code)).inc()
        started = g.get(_STARTED)
        if started is not None:
            REQUEST_SECONDS.labels(route=route, method=method).observe(
                time.perf_counter() - started
            )
    except Exception as exc:  # counting must never fail a request
        log.debug("metrics: request not counted: %s", exc)
    return response
