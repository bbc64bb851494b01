"""Per-process state of a pool process: DB sessions, the model holder, the image loader and
the dynamic batcher, created lazily (in the pool process, after the fork: s3fs clients must
not cross a fork).

With ``--pool threads`` several tasks ask for them at once, so each is built under one lock:
two threads must never load two copies of the model.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from functools import wraps
from typing import TypeVar

from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.faces.detection import FaceDetector
from face_emotions.jobs.database import create_db_engine
from face_emotions.jobs.database import session_factory
from face_emotions.jobs.worker_heartbeats import BUSY
from face_emotions.jobs.worker_heartbeats import IDLE
from face_emotions.jobs.worker_heartbeats import INFERENCE
from face_emotions.jobs.worker_heartbeats import Beat
from face_emotions.jobs.worker_heartbeats import Heartbeat
from face_emotions.jobs.worker_heartbeats import heartbeat_period
from face_emotions.ops import inference_metrics as metrics
from face_emotions.registry.mlflow_registry import RegistryError
from face_emotions.serving.chunk_classifier import default_worker_name
from face_emotions.serving.device_assignment import assign_device
from face_emotions.serving.device_assignment import cuda_device_count
from face_emotions.serving.dynamic_batcher import DynamicBatcher
from face_emotions.serving.image_loading import ImageLoader
from face_emotions.serving.image_loading import storage_image_loader
from face_emotions.serving.model_holder import ModelHolder
from face_emotions.serving.model_holder import ModelUnavailable
from face_emotions.serving.model_holder import ServingModel
from face_emotions.settings import Settings
from face_emotions.settings import get_settings
from worker.reload_signal import reload_generation

log = logging.getLogger(__name__)

T = TypeVar("T")
_BUILD_LOCK = threading.RLock()


def _once(build: Callable[[], T]) -> Callable[[], T]:
    """``lru_cache(maxsize=1)`` that also never runs ``build`` twice at the same time."""
    cached = lru_cache(maxsize=1)(build)

    @wraps(build)
    def get() -> T:
        with _BUILD_LOCK:
            return cached()

    return get


def configure_torch_threads(settings: Settings) -> None:
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


@_once
def sessions() -> sessionmaker[Session]:
    # One SQLite connection per process: with ``--pool threads`` the chunks running at once
    # queue for it instead of sleeping in SQLite's busy handler (no effect on PostgreSQL).
    return session_factory(
        create_db_engine(get_settings().resolved_database_url, one_connection=True)
    )


@_once
def image_loader() -> ImageLoader:
    """Reads local paths and ``s3://`` URLs (EMOTIONS_S3_ENDPOINT_URL).

    Cached so a pool process keeps one S3 client (connection pool) for all its tasks.
    """
    return storage_image_loader(get_settings())


#: This process's device once assigned (``cpu`` or ``cuda:N``); see :func:`assign_process_device`.
_DEVICE: list[str] = []


def assign_process_device(process_index: int) -> str | None:
    """Pin this process to its device: GPU ``process_index % n`` round-robin, or what
    EMOTIONS_DEVICE forces (cuda:N, cpu). Cheap (NVML counts the GPUs; CUDA itself is first
    touched when the model loads), so it runs in ``worker_process_init``.

    A device this machine cannot serve (cuda:3 on two GPUs, cuda without one) is logged and
    left unassigned: the model load of each task then fails with the same reason.
    """
    settings = get_settings()
    try:
        device = assign_device(settings.device, process_index, cuda_device_count())
    except (ValueError, RuntimeError) as exc:
        log.error("process %d has no device: %s", process_index, exc)
        _DEVICE.clear()
        return None
    _DEVICE[:] = [device]
    metrics.set_worker_device(default_worker_name(), device)
    log.info("process %d runs its model on %s", process_index, device)
    return device


def process_device() -> str:
    """This process's device: the one assigned, else (a threads or solo pool's only process,
    the CLI, tests) the one of process 0. Raises when EMOTIONS_DEVICE can't be served here."""
    if _DEVICE:
        return _DEVICE[0]
    return assign_device(get_settings().device, 0, cuda_device_count())


@_once
def holder() -> ModelHolder:
    settings = get_settings()
    # A threads pool has no worker_process_init: set the intra-op threads here too.
    configure_torch_threads(settings)
    model_holder = ModelHolder(
        settings,
        device=process_device(),
        reload_generation=reload_generation,
        # An idle worker that swapped to a new champion says so now, not at its next task.
        on_swap=lambda _version: _beat_now(),
    )
    _start_idle_refresher(model_holder, settings.model_refresh_seconds)
    _BUILT.append(model_holder)
    return model_holder


#: The holder once the first task built it (the heartbeat reads it, never builds it: loading a
#: model is a task's job, not a heartbeat's).
_BUILT: list[ModelHolder] = []
_HEARTBEATS: list[Heartbeat] = []
#: Tasks this process is running now (several with ``--pool threads``).
_RUNNING = [0]
_RUNNING_LOCK = threading.Lock()


def _serving() -> Beat:
    """What the heartbeat says: idle or busy, and the version loaded. A prefork pool process
    loads its model with its first task, so an idle one that never worked reports none."""
    state = BUSY if _RUNNING[0] else IDLE
    device = _DEVICE[0] if _DEVICE else None  # known before the model is loaded
    if not _BUILT:
        return Beat(device=device, state=state)
    described = _BUILT[0].describe()
    return Beat(described["version"], described["device"], described["backend"], state)


@contextmanager
def busy() -> Iterator[None]:
    """Around a task: the process reports ``busy`` while one runs, ``idle`` again after.

    The heartbeat thread writes the change (not the task: a stream of short tasks must not pay
    a database round trip each), once it has lasted a moment.
    """
    with _RUNNING_LOCK:
        _RUNNING[0] += 1
        changed = _RUNNING[0] == 1
    if changed:
        _state_changed()
    try:
        yield
    finally:
        with _RUNNING_LOCK:
            _RUNNING[0] -= 1
            changed = _RUNNING[0] == 0
        if changed:
            _state_changed()


def start_heartbeat() -> None:
    """Report this pool process alive, busy or idle, until :func:`stop_heartbeat`."""
    heartbeat = Heartbeat(
        sessions(),
        default_worker_name(),
        role=INFERENCE,
        state=_serving,
        period=heartbeat_period(get_settings().worker_stale_seconds),
    )
    heartbeat.start()
    _HEARTBEATS.append(heartbeat)


def stop_heartbeat() -> None:
    while _HEARTBEATS:
        _HEARTBEATS.pop().stop()


def _beat_now() -> None:
    for heartbeat in _HEARTBEATS:
        heartbeat.beat()


def _state_changed() -> None:
    for heartbeat in _HEARTBEATS:
        heartbeat.changed()


@_once
def detector() -> FaceDetector:
    """The process's face detector, on the process's device (a GPU worker detects on its GPU,
    a pool process pinned to cuda:1 on cuda:1).

    Built on first use, in the pool process: a detector that cannot load (its package missing)
    fails the task with the reason, which retries and in the end fails the images saying why.
    """
    settings = get_settings()
    return FaceDetector.from_settings(settings, process_device())


@_once
def batcher() -> DynamicBatcher | None:
    """The process's shared-forward-pass batcher (EMOTIONS_DYNAMIC_BATCHING), or ``None``."""
    settings = get_settings()
    if not settings.dynamic_batching:
        return None
    model_holder = holder()
    log.info(
        "dynamic batching: up to %d images per forward pass, %.0f ms delay",
        settings.batch_size,
        settings.max_batch_delay_ms,
    )
    warn_if_nothing_to_batch()

    def model_for(pinned: int | None) -> ServingModel:
        try:
            return model_holder.for_job(pinned)
        except RegistryError as exc:
            if pinned is None:  # no champion to serve: retry later, as without batching
                raise ModelUnavailable(str(exc)) from exc
            raise

    return DynamicBatcher(
        model_for,
        max_batch=settings.batch_size,
        max_delay_ms=settings.max_batch_delay_ms,
    )


def warn_if_nothing_to_batch() -> bool:
    """A prefork pool process runs one task at a time (in its main thread): with dynamic
    batching on, every pass would only wait out the delay alone. Say so instead of silently
    running slower; ``True`` when warned."""
    if threading.current_thread() is not threading.main_thread():
        return False
    log.warning(
        "EMOTIONS_DYNAMIC_BATCHING is on, but this worker runs one task at a time per "
        "process, so there is nothing to share a forward pass with and each micro-batch "
        "waits EMOTIONS_MAX_BATCH_DELAY_MS for nothing: start it with "
        "--pool threads --concurrency N"
    )
    return True


def _start_idle_refresher(model_holder: ModelHolder, interval: float) -> None:
    """Pre-load a newly promoted version while the worker is idle, so the swap is instant."""
    if interval <= 0:
        return

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            try:
                model_holder.poll()
            except Exception as exc:
                log.debug("idle model refresh failed: %s", exc)

    threading.Thread(target=loop, name="model-refresher", daemon=True).start()
