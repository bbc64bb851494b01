"""The ``trainer`` service: training runs requested through the API, executed from a queue.

Start with ``celery -A training.service worker -Q training --concurrency 1``. One run at a
time per trainer: a run uses every core (or the GPU) it can get, and two would only slow each
other down. The reliability settings are the inference worker's (``acks_late``,
``reject_on_worker_lost``, prefetch 1), so a trainer that dies mid-run gets its run back from
the broker and restarts it; the run's row (not the broker) says whether there is anything left
to do, so a redelivered task for a finished run does nothing.

Runs last hours, not seconds, so this app's Redis visibility timeout is at least 6 h, and it
keeps its unacknowledged tasks under keys of its own: kombu's Redis transport restores *every*
unacknowledged message of a database that is older than the restoring consumer's timeout, and
an inference worker (1 h) would otherwise hand a 2 h training run to a second trainer.

When a run promotes a version, the trainer broadcasts ``emotions_reload_model`` on the same
broker, so inference workers swap to it at their next micro-batch instead of at their next poll.
"""

from __future__ import annotations

import logging
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from celery import Celery
from celery.signals import after_setup_logger
from celery.signals import after_setup_task_logger
from celery.signals import worker_ready
from celery.worker.control import Panel
from celery.worker.control import control_command
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs import training_runs as db_runs
from face_emotions.jobs.broker import BrokerClient
from face_emotions.jobs.database import create_db_engine
from face_emotions.jobs.database import session_factory
from face_emotions.jobs.database import with_db_retry
from face_emotions.jobs.protocol import RELOAD_COMMAND
from face_emotions.jobs.protocol import TRAIN_TASK
from face_emotions.jobs.schema import TrainingRun
from face_emotions.ops.log_format import apply_format
from face_emotions.ops.malloc_tuning import tune_glibc_malloc
from face_emotions.ops.redaction import install_log_redaction
from face_emotions.settings import Settings
from face_emotions.settings import get_settings

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
        # A fresh pool process per run: whatever a run leaves behind (CUDA context, allocator
        # caches, Lightning globals) is gone before the next one starts.
        "worker_max_tasks_per_child": 1,
    }


app = Celery("face_emotions.trainer", broker=settings.broker_url)
app.conf.update(celery_config(settings))
broker = BrokerClient.from_settings(settings)


# -- the task ---------------------------------------------------------------------------------


@app.task(name=TRAIN_TASK)
def train(run_id: str) -> str | None:
    """Execute training run ``run_id``; returns its final status (None: nothing to do)."""
    return execute_run(
        uuid.UUID(run_id),
        settings=settings,
        sessions=_sessions(),
        announce=broker.announce_promotion,
    )


@dataclass(frozen=True)
class _Outcome:
    mlflow_run_id: str | None
    registered_version: int | None
    promoted: bool
    promotion_reason: str | None
    metrics: dict[str, Any]


def execute_run(
    run_id: uuid.UUID,
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    announce: Callable[[], None] | None = None,
    train_fn: Callable[..., Any] | None = None,
) -> str | None:
    """Load the run, train, record the outcome; every failure is recorded, none is raised.

    Failures are not retried: a bad override or a bad folder fails the same way twice, and a
    run of hours should not silently start again. ``announce`` reaches the workers when the
    run promotes its version; ``train_fn`` replaces ``run_training`` in tests.
    """
    from training.train import compose_config
    from training.train import run_training

    run = with_db_retry(lambda: _start(sessions, run_id))
    if run is None:
        log.info("training run %s is finished or gone; nothing to do", run_id)
        return None
    log.info("training run %s: attempt %d", run_id, run.attempts)

    try:
        data_dir = db_runs.resolve_data_path(settings.resolved_data_root, run.data_path)
        output_dir = settings.var_dir / "runs" / str(run_id)
        overrides = build_overrides(run, data_dir, output_dir)
        cfg = compose_config(overrides)
    except Exception as exc:
        message = f"invalid training configuration: {exc}"
        log.warning("training run %s: %s", run_id, message)
        _record_failure(sessions, run_id, message)
        return "failed"

    # A restarted run must not pick up the dead attempt's checkpoints as its own.
    shutil.rmtree(output_dir, ignore_errors=True)
    try:
        result = (train_fn or run_training)(cfg, announce=announce)
    except Exception as exc:
        log.exception("training run %s failed", run_id)
        _record_failure(sessions, run_id, _message(exc))
        return "failed"

    outcome = _outcome(result)
    with_db_retry(lambda: _record_success(sessions, run_id, outcome))
    log.info(
        "training run %s succeeded: version %s, promoted %s (%s)",
        run_id,
        outcome.registered_version,
        outcome.promoted,
        outcome.promotion_reason,
    )
    return "succeeded"


def build_overrides(run: TrainingRun, data_dir: Path, output_dir: Path) -> list[str]:
    """The run's own overrides plus those the service owns (the API refuses them in requests).

    Paths are quoted for Hydra's override grammar, so a data root with spaces, quotes, commas
    or ``${`` is taken literally.
    """
    return [
        *run.overrides,
        f"data.path={hydra_quote(str(data_dir))}",
        f"promote={run.promote}",
        f"output_dir={hydra_quote(str(output_dir))}",
        # One line per redraw in a service log is noise; the run's curves are in MLflow.
        "training.progress_bar=false",
    ]


def hydra_quote(value: str) -> str:
    """A single-quoted Hydra override value that reads back exactly as ``value``.

    Backslashes are doubled only where Hydra would read them as escapes (before a quote, an
    interpolation or the closing quote); ``${`` is escaped so OmegaConf does not resolve it.
    """
    escaped = re.sub(r"(\\+)(?='|\$\{|$)", lambda m: m.group(1) * 2, value)
    escaped = escaped.replace("'", "\\'").replace("${", "\\${")
    return f"'{escaped}'"


# -- recording ----------------------------------------------------------------------------


def _start(sessions: sessionmaker[Session], run_id: uuid.UUID) -> TrainingRun | None:
    with sessions() as session:
        run = db_runs.mark_running(session, run_id)
        session.commit()
        return run


def _record_failure(sessions: sessionmaker[Session], run_id: uuid.UUID, message: str) -> None:
    def write() -> None:
        with sessions() as session:
            db_runs.mark_failed(session, run_id, message)
            session.commit()

    try:
        with_db_retry(write)
    except Exception:
        # Nothing else to do: the task ends, the row stays "running" and says so.
        log.exception("training run %s: could not record the failure %r", run_id, message)


def _record_success(sessions: sessionmaker[Session], run_id: uuid.UUID, outcome: _Outcome) -> None:
    with sessions() as session:
        db_runs.mark_succeeded(
            session,
            run_id,
            mlflow_run_id=outcome.mlflow_run_id,
            registered_version=outcome.registered_version,
            promoted=outcome.promoted,
            promotion_reason=outcome.promotion_reason,
            metrics=outcome.metrics,
        )
        session.commit()


def _outcome(result: Any) -> _Outcome:
    """What the row keeps of a ``TrainingResult``: ids, the decision and the test metrics."""
    summary = result.summary()
    metrics = {key: value for key, value in summary.items() if key.startswith("test_")}
    metrics["passed_targets"] = bool(summary.get("passed_targets"))
    promotion = result.promotion
    return _Outcome(
        mlflow_run_id=result.run_id,
        registered_version=result.version.version if result.version else None,
        promoted=bool(promotion and promotion.promote),
        promotion_reason=promotion.reason if promotion else None,
        metrics=metrics,
    )


def _message(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


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
