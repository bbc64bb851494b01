"""Prometheus metrics of the inference workers and the helpers the chunk classifier calls.

Each worker serves these on ``EMOTIONS_WORKER_METRICS_PORT`` (see worker.app). Celery's prefork
pool runs the chunks in forked processes, so the worker runs prometheus-client in multiprocess
mode: every pool process writes its samples to files under ``PROMETHEUS_MULTIPROC_DIR``, which
the worker's main process exports before this module is imported
(:mod:`face_emotions.ops.prometheus_multiprocess`), and the main process serves their sum.
Anywhere else (tests, the CLI, a ``solo`` or ``threads`` pool) they live in the default registry.

What the numbers mean:

- ``emotions_images_processed_total{model_version}`` / ``emotions_images_failed_total``: images
  this worker gave a prediction / a per-image error. Pass the counts of rows really inserted
  (what ``record_results`` returns), so a redelivered chunk never counts an image twice.
- ``emotions_microbatch_size``: images per forward pass; ``emotions_forward_seconds``: its time.
  With dynamic batching, observe the shared pass once (where it runs), not once per chunk.
- ``emotions_decode_seconds``: time to decode one micro-batch (or waiting for it to be
  decoded, as the caller documents).
- ``emotions_lookahead_total{outcome}``: the next chunk's first micro-batch decoded ahead
  (:mod:`face_emotions.serving.chunk_lookahead`): ``hit`` when the next chunk used it,
  ``miss`` when it was dropped.
- ``emotions_model_version{worker}``: the version a worker process serves (champion); the
  series of a process goes away when the process does (``livemax``).
- ``emotions_worker_device_info{worker, device}``: 1 for the device (``cpu``, ``cuda:N``) each
  worker process runs its model on, set when the process starts; gone with the process too.
- ``emotions_worker_backend_info{worker, model_version, backend}``: 1 for the backend a worker
  process serves its champion with (``EMOTIONS_BACKEND=auto``: the one its load-time
  measurement chose), 0 for the ones it served before a hot reload.

The helpers never raise: a metrics problem must not fail a chunk.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import ParamSpec

from prometheus_client import Counter
from prometheus_client import Gauge
from prometheus_client import Histogram

log = logging.getLogger(__name__)
P = ParamSpec("P")

#: Images per forward pass: powers of two up to the largest sensible micro-batch.
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
#: Seconds, from a small GPU batch (milliseconds) to a large CPU one (tens of seconds).
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Label value of images classified without a known version (never expected, but not lost).
NO_VERSION = "none"

IMAGES_PROCESSED = Counter(
    "emotions_images_processed",
    "Images this worker classified (a prediction written to the database), by model version.",
    ["model_version"],
)
IMAGES_FAILED = Counter(
    "emotions_images_failed",
    "Images this worker gave a per-image error (unreadable, too large, no model, gave up).",
)
MICROBATCH_SIZE = Histogram(
    "emotions_microbatch_size",
    "Images per forward pass.",
    buckets=BATCH_SIZE_BUCKETS,
)
FORWARD_SECONDS = Histogram(
    "emotions_forward_seconds",
    "Seconds per forward pass (one micro-batch through the model).",
    buckets=SECONDS_BUCKETS,
)
DECODE_SECONDS = Histogram(
    "emotions_decode_seconds",
    "Seconds to decode one micro-batch of images.",
    buckets=SECONDS_BUCKETS,
)
LOOKAHEAD = Counter(
    "emotions_lookahead",
    "Guesses at the next chunk's first micro-batch, decoded ahead: hit (the next chunk used "
    "it) or miss (dropped; the worker then guesses less often).",
    ["outcome"],
)
MODEL_VERSION = Gauge(
    "emotions_model_version",
    "Model version a worker process serves (its champion).",
    ["worker"],
    multiprocess_mode="livemax",
)

DEVICE_INFO = Gauge(
    "emotions_worker_device_info",
    "Device a worker process runs its model on (cpu or cuda:N, one GPU per pool process); "
    "the value is always 1.",
    ["worker", "device"],
    multiprocess_mode="livemax",
)


def _never_raises(function: Callable[P, None]) -> Callable[P, None]:
    warned = False

    @functools.wraps(function)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> None:
        nonlocal warned
        try:
            function(*args, **kwargs)
        except Exception as exc:  # e.g. the multiprocess directory was removed
            if not warned:
                warned = True
                log.warning("metrics: %s failed, samples are lost: %s", function.__name__, exc)

    return wrapper


@_never_raises
def observe_decode(seconds: float) -> None:
    """One micro-batch was decoded in ``seconds``."""
    DECODE_SECONDS.observe(max(seconds, 0.0))


@_never_raises
def observe_forward(seconds: float, images: int) -> None:
    """One forward pass of ``images`` images took ``seconds``."""
    if images <= 0:
        return
    FORWARD_SECONDS.observe(max(seconds, 0.0))
    MICROBATCH_SIZE.observe(images)


@_never_raises
def count_lookahead(outcome: str) -> None:
    """A guess at the next chunk was used (``hit``) or dropped (``miss``)."""
    LOOKAHEAD.labels(outcome=outcome).inc()


@_never_raises
def count_images(*, processed: int, failed: int, model_version: int | None) -> None:
    """Images newly given a prediction (by ``model_version``) or a per-image error."""
    if processed > 0:
        IMAGES_PROCESSED.labels(model_version=_version_label(model_version)).inc(processed)
    if failed > 0:
        IMAGES_FAILED.inc(failed)


@_never_raises
def set_model_version(worker: str, version: int | None) -> None:
    """The version ``worker`` (this process) serves now. ``None`` (nothing loaded yet) sets
    nothing: a holder keeps its model once it has one, and a multiprocess gauge can't be unset."""
    if version is not None:
        MODEL_VERSION.labels(worker=worker).set(version)


BACKEND_INFO = Gauge(
    "emotions_worker_backend_info",
    "Backend a worker process serves its champion with (onnx, onnx-int8, torch, torch-bf16): "
    "1 for the current one, 0 for earlier ones.",
    ["worker", "model_version", "backend"],
    multiprocess_mode="livemax",
)
#: The (worker, version, backend) label set at 1 per process, to set back to 0 on a change (a
#: multiprocess gauge's series can't be removed).
_SERVING_BACKEND: dict[str, tuple[str, str]] = {}


@_never_raises
def set_serving_backend(worker: str, version: int | None, backend: str | None) -> None:
    """``worker`` (this process) serves ``version`` with ``backend`` now."""
    if version is None or backend is None:
        return
    labels = (str(version), backend)
    previous = _SERVING_BACKEND.get(worker)
    if previous == labels:
        return
    if previous is not None:
        BACKEND_INFO.labels(worker, *previous).set(0)
    BACKEND_INFO.labels(worker, *labels).set(1)
    _SERVING_BACKEND[worker] = labels


@_never_raises
def set_worker_device(worker: str, device: str) -> None:
    """``worker`` (this process) runs its model on ``device``: once, when it is assigned."""
    DEVICE_INFO.labels(worker=worker, device=device).set(1)


def record_batch(
    *,
    processed: int,
    failed: int,
    model_version: int | None,
    forward_images: int = 0,
    forward_seconds: float | None = None,
    decode_seconds: float | None = None,
) -> None:
    """Everything about one micro-batch at once: what it wrote, its forward pass (skip it
    with ``forward_images=0``, e.g. with dynamic batching) and its decode time."""
    count_images(processed=processed, failed=failed, model_version=model_version)
    if forward_seconds is not None:
        observe_forward(forward_seconds, forward_images)
    if decode_seconds is not None:
        observe_decode(decode_seconds)


def _version_label(version: int | None) -> str:
    return NO_VERSION if version is None else str(version)
