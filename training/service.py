"""The ``trainer`` service: training runs requested through the API, executed from a queue.

Start with ``celery -A training.service worker -Q training --concurrency 1``. One run at a
time per trainer: a run uses every core (or the GPU) it can get, and two would only slow each
other down. The reliability settings are the inference worker's (``acks_late``,
``reject_on_worker_lost``, prefetch 1), so a trainer that dies mid-run gets its run back from
the broker and restarts it; the run's row (not the broker) says whether there is anything left
to do, so a redelivered task for a finished run does nothing, and a stale copy of a run that
was sent twice (its message carries an older dispatch stamp) starts nothing.

Runs last hours, not seconds, so this app's Redis visibility timeout is at least 6 h, and it
keeps its unacknowledged tasks under keys of its own: kombu's Redis transport restores *every*
unacknowledged message of a database that is older than the restoring consumer's timeout, and
an inference worker (1 h) would otherwise hand a 2 h training run to a second trainer.

Each run trains in a process of its own (:mod:`training.supervisor` starts and watches it):
Celery's pool processes are daemonic and could not start DataLoader workers. When a run promotes
a version, it broadcasts ``emotions_reload_model`` on the same broker, so inference workers swap
to it at their next micro-batch instead of at their next poll. While it is up, the trainer
heartbeats (``workers`` rows of role ``training``), so the API can say when no trainer is
consuming the training queue.
"""

from __future__ import annotations

import logging
import socket
import uuid
from functools import lru_cache
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger
from celery.signals import after_setup_task_logger
from celery.signals import worker_ready
from celery.signals import worker_shutdown
from celery.worker.control import Panel
from celery.worker.control import control_command
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs import training_runs as db_runs
from face_emotions.jobs.broker import BrokerClient
from face_emotions.jobs.database import create_db_engine
from face_emotions.jobs.database import session_factory
from face_emotions.jobs.protocol import RELOAD_COMMAND
from face_emotions.jobs.protocol import TRAIN_TASK
from face_emotions.jobs.worker_heartbeats import TRAINING
from face_emotions.jobs.worker_heartbeats import Heartbeat
from face_emotions.jobs.worker_heartbeats import heartbeat_period
from face_emotions.ops.log_format import apply_format
from face_emotions.ops.malloc_tuning import tune_glibc_malloc
from face_emotions.ops.redaction import install_log_redaction
from face_emotions.settings import Settings
from face_emotions.settings import get_settings
from training.supervisor import supervise

# Before torch allocates anything and before the pool forks: children inherit it.
tune_glibc_malloc()

log = logging.getLogger(__name__)
settings = get_settings()

MIN_VISIBILITY_TIMEOUT = 6 * 3600
#: Redis keys of this app's unacknowledged tasks (see the module docstring).
UNACKED_KEYS = {
    "unacked_key": "unacked_training",
    "unacked_index_key": "unacked_training_index",
    "unacked_mutex_key": "unacked_training_mutex",
}


def celery_config(settings: Settings) -> dict[str, Any]:
    """The trainer's Celery settings; a function so tests can check them for any settings."""
    return {
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": settings.training_queue,
        "task_routes": {TRAIN_TASK: {"queue": settings.training_queue}},
        "broker_transport_options": {
            "visibility_timeout": max(settings.visibility_timeout, MIN_VISIBILITY_TIMEOUT),
            **UNACKED_KEYS,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
        # A fresh pool process per run (the run itself has a process of its own anyway).
        "worker_max_tasks_per_child": 1,
    }


app = Celery("face_emotions.trainer", broker=settings.broker_url)
app.conf.update(celery_config(settings))
broker = BrokerClient.from_settings(settings)


# -- the task ---------------------------------------------------------------------------------


@app.task(name=TRAIN_TASK)
def train(run_id: str, dispatch: str | None = None) -> str | None:
    """Execute training run ``run_id``; returns its final status (None: nothing to do).
    ``dispatch``: which sending of the run this message is (a stale copy starts nothing)."""
    return supervise(uuid.UUID(run_id), settings=settings, sessions=_sessions(), dispatch=dispatch)


@lru_cache(maxsize=1)
def _sessions() -> sessionmaker[Session]:
    """Per pool process (``max_tasks_per_child=1`` makes each run its own process)."""
    return session_factory(create_db_engine(settings.resolved_database_url))


# -- worker hooks -----------------------------------------------------------------------------


@after_setup_logger.connect
@after_setup_task_logger.connect
def _log_format(logger: Any = None, loglevel: Any = None, **_kwargs: Any) -> None:
    """EMOTIONS_LOG_FORMAT=json: the trainer's log lines are JSON too."""
    if logger is not None:
        apply_format(logger, settings, level=loglevel)
        install_log_redaction(settings, ("celery", "training", "face_emotions"))


HEARTBEAT: list[Heartbeat] = []


@worker_ready.connect
def _start_heartbeat(sender: Any = None, **_kwargs: Any) -> None:
    """Say this trainer consumes the training queue, and which data root it reads."""
    if sender is not None and getattr(sender, "app", app) is not app:
        return
    name = getattr(sender, "hostname", None) or f"trainer@{socket.gethostname()}"
    try:
        data_root = str(settings.resolved_data_root)
    except ValueError:  # an object-store root: runs will fail, and say why
        data_root = str(settings.data_root)
    engine = create_db_engine(settings.resolved_database_url)
    heartbeat = Heartbeat(
        session_factory(engine),
        name,
        role=TRAINING,
        data_root=data_root,
        period=heartbeat_period(settings.worker_stale_seconds),
    )
    heartbeat.start()
    HEARTBEAT.append(heartbeat)


@worker_shutdown.connect
def _stop_heartbeat(**_kwargs: Any) -> None:
    while HEARTBEAT:
        HEARTBEAT.pop().stop()


@worker_ready.connect
def _dispatch_pending(sender: Any = None, **_kwargs: Any) -> None:
    """Send the runs the API accepted while the broker was down (it is up: we are ready)."""
    if sender is not None and getattr(sender, "app", app) is not app:
        return  # another Celery app's worker in this process (the signal is global)
    engine = create_db_engine(settings.resolved_database_url)
    try:
        sent, error = db_runs.dispatch_pending(session_factory(engine), broker.send_training_run)
    except Exception as exc:  # a trainer must start even while the database is down
        log.warning("could not dispatch pending training runs: %s", exc)
        return
    finally:
        engine.dispose()
    if sent:
        log.info("dispatched %d pending training run(s)", len(sent))
    if error is not None:
        log.warning("dispatching pending training runs stopped: %s", error)


if RELOAD_COMMAND not in Panel.data:
    # The trainer's own mailbox also receives the broadcast it sends; without a handler it
    # would log a "no such method" traceback after every promotion. Registered only when the
    # inference worker's real handler is not loaded in this process (Panel is process-wide).

    @control_command(name=RELOAD_COMMAND)
    def _ignore_reload(_state: Any, **_kwargs: Any) -> dict[str, str]:
        """A trainer serves no model: acknowledge and ignore."""
        return {"ok": "trainer: no model to reload"}
