"""Celery application of the inference worker.

Start with ``celery -A worker.app worker -Q inference``. The worker sizes its own prefork pool
(``EMOTIONS_WORKER_PROCESSES``, default ``auto``): one pool process per visible GPU, each pinned
to its own device round-robin (pool process ``i`` on GPU ``i % n``, see
face_emotions.serving.device_assignment), and one process on a CPU-only host or with
``EMOTIONS_DEVICE=cuda:N``; an explicit ``--concurrency N`` still wins. With ``--pool threads``
every thread of the one process shares one device. Reliability settings:
a task is acknowledged only after it finished (``acks_late``), redelivered if its process
dies (``reject_on_worker_lost``), and each process reserves one task at a time (prefetch 1) so
a crash strands at most one chunk. Redis redelivers unacknowledged tasks after
``EMOTIONS_VISIBILITY_TIMEOUT`` seconds, which must exceed the longest chunk.

What the broker cannot redeliver (tasks lost in a Redis restart, the task of a worker killed as a
whole before the visibility timeout, jobs the API could not dispatch) is found by the recovery
sweeper that the main process of every worker runs (see worker.recovery).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger
from celery.signals import after_setup_task_logger
from celery.signals import celeryd_init
from celery.signals import import_modules
from celery.signals import worker_process_init
from celery.signals import worker_process_shutdown
from celery.signals import worker_ready
from celery.signals import worker_shutdown
from celery.worker.control import control_command

from face_emotions.jobs.broker import BrokerClient
from face_emotions.jobs.protocol import CLASSIFY_TASK
from face_emotions.jobs.protocol import INFERENCE_QUEUE
from face_emotions.jobs.protocol import RELOAD_COMMAND
from face_emotions.ops.log_format import apply_format
from face_emotions.ops.malloc_tuning import tune_glibc_malloc
from face_emotions.ops.redaction import install_log_redaction
from face_emotions.settings import get_settings
from worker.metrics_server import WorkerMetrics
from worker.recovery import RecoverySweeper
from worker.reload_signal import request_reload

# Before torch allocates anything and before the pool forks: children inherit it.
tune_glibc_malloc()

log = logging.getLogger(__name__)
settings = get_settings()

app = Celery("face_emotions.worker", broker=settings.broker_url, include=["worker.tasks"])
app.conf.update(
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_ignore_result=True,
    task_default_queue=INFERENCE_QUEUE,
    task_routes={CLASSIFY_TASK: {"queue": INFERENCE_QUEUE}},
    broker_transport_options={"visibility_timeout": settings.visibility_timeout},
    broker_connection_retry_on_startup=True,
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
    # Redis restarts must not kill the worker: keep reconnecting.
    broker_connection_max_retries=None,
    # KiB; None = never recycle. Checked after each task, so a chunk is never cut short.
    worker_max_memory_per_child=(
        settings.worker_max_memory_mb * 1024 if settings.worker_max_memory_mb else None
    ),
)


SWEEPER = RecoverySweeper(BrokerClient.from_settings(settings), settings)


@celeryd_init.connect
def _size_the_pool(conf: Any = None, options: dict[str, Any] | None = None, **_kwargs) -> None:
    """Set ``worker_concurrency`` from EMOTIONS_WORKER_PROCESSES (``auto``: one prefork pool
    process per visible GPU).

    ``celeryd_init`` comes in the worker's main process after the command line is parsed and
    before the worker reads ``worker_concurrency``; a ``--concurrency`` given there was handed
    to the worker as an option, which Celery prefers to the configuration, so it still wins.
    The GPUs are counted through NVML: CUDA is not initialised before the pool forks.
    """
    if conf is None:
        return
    options = options or {}
    # As WorkController.setup_defaults picks the pool: --pool (a class), else worker_pool.
    pool = options.get("pool") or options.get("pool_cls") or conf.worker_pool
    processes = pool_processes(pool)
    if processes is not None:  # the start-up banner shows the size the worker runs with
        conf.worker_concurrency = processes


def pool_processes(pool: Any) -> int | None:
    """The pool size EMOTIONS_WORKER_PROCESSES asks for with this pool class (or alias);
    ``None`` leaves Celery's default (``auto`` with a pool that is not prefork)."""
    from celery.concurrency import get_implementation
    from celery.concurrency.prefork import TaskPool as PreforkPool

    from face_emotions.serving.device_assignment import assign_device
    from face_emotions.serving.device_assignment import cuda_device_count
    from face_emotions.serving.device_assignment import worker_processes

    pool_cls = get_implementation(pool)
    prefork = isinstance(pool_cls, type) and issubclass(pool_cls, PreforkPool)
    if settings.worker_processes == "auto" and not prefork:
        return None
    count = cuda_device_count()
    try:
        assign_device(settings.device, 0, count)
    except (ValueError, RuntimeError) as exc:  # say it once here, not only in every task
        log.error("EMOTIONS_DEVICE cannot be served on this host, tasks will fail: %s", exc)
    return worker_processes(settings.worker_processes, settings.device, count)


@worker_ready.connect
def _start_sweeper(**_kwargs) -> None:
    """Only the main process gets ``worker_ready``: one sweeper thread per worker."""
    SWEEPER.start()


@worker_shutdown.connect
def _stop_sweeper(**_kwargs) -> None:
    SWEEPER.stop()


# Prometheus: pool processes write samples to a per-worker directory, the main process serves
# their sum on EMOTIONS_WORKER_METRICS_PORT (see worker.metrics_server for the order of events).
METRICS = WorkerMetrics(settings)


@import_modules.connect
def _prepare_metrics(sender=None, **_kwargs) -> None:
    """Before the task modules (and with them prometheus_client) are imported."""
    if sender is app:
        METRICS.prepare()


@worker_ready.connect
def _serve_metrics(**_kwargs) -> None:
    METRICS.serve()


@worker_process_shutdown.connect
def _forget_pool_process(pid=None, **_kwargs) -> None:
    from worker.runtime import stop_heartbeat

    stop_heartbeat()  # this pool process is gone: say so instead of waiting for it to expire
    METRICS.process_exited(pid or os.getpid())


@worker_ready.connect
def _heartbeat_without_pool_processes(sender: Any = None, **_kwargs: Any) -> None:
    """``--pool threads`` (or ``solo``) runs tasks in this process, which gets no
    ``worker_process_init``: it heartbeats from here instead."""
    from celery.concurrency.prefork import TaskPool as PreforkPool

    pool_cls = getattr(getattr(sender, "controller", None), "pool_cls", None)
    if isinstance(pool_cls, type) and issubclass(pool_cls, PreforkPool):
        return
    from worker.runtime import assign_process_device
    from worker.runtime import start_heartbeat

    assign_process_device(0)  # every thread of this one process shares its device
    start_heartbeat()


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs: Any) -> None:
    from worker.runtime import stop_heartbeat

    stop_heartbeat()


@worker_shutdown.connect
def _stop_metrics(**_kwargs) -> None:
    METRICS.stop()


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger=None, loglevel=None, **_kwargs) -> None:
    """EMOTIONS_LOG_FORMAT=json: Celery's handlers write JSON lines (hijack_root_logger is
    off, so Celery installs them only where nothing else has)."""
    if logger is not None:
        apply_format(logger, settings, level=loglevel)
        install_log_redaction(settings, ("celery", "worker", "face_emotions"))


@control_command(name=RELOAD_COMMAND)
def reload_model(state: Any, **_kwargs: Any) -> dict[str, str]:
    """Broadcast target: ask every pool process to re-check the serving alias now."""
    generation = request_reload()
    log.info("model reload requested (generation %s)", generation)
    return {"ok": f"reload requested (generation {generation})"}


@worker_process_init.connect
def _init_pool_process(**_kwargs) -> None:
    """Cheap per-process set-up only: Celery kills a child that takes over 4 s here.

    The model itself is loaded by the first task (see worker.runtime), never in the parent:
    CUDA can't survive a fork and a loaded model would be copied into every child. The device
    is only chosen here: pool process ``i`` (billiard's index, kept by the process that replaces
    it, the ``%i`` of log file names) takes GPU ``i % n``.
    """
    # The task modules' imports, not ours (prometheus-client must see its directory first).
    from worker.runtime import assign_process_device
    from worker.runtime import configure_torch_threads
    from worker.runtime import start_heartbeat

    # A pool process forked after the sweeper started inherits its engine: let it go unused.
    SWEEPER.forget_after_fork()
    configure_torch_threads(settings)
    assign_process_device(pool_process_index())
    start_heartbeat()  # a thread: this process is alive even before its first task


def pool_process_index() -> int:
    """This pool process's index (0 to concurrency - 1); 0 in a worker's main process."""
    from billiard.process import current_process

    index = getattr(current_process(), "index", None)
    return index if isinstance(index, int) else 0
