"""One training run of the trainer service, recorded in its row from start to finish.

The trainer's task (:mod:`training.supervisor`) starts the run here and composes its
configuration; the run's own process (:mod:`training.run_process`) trains through
:func:`train_and_record`, which stores progress, the MLflow run id as soon as it exists, and the
outcome. Every failure is recorded, none is raised: a bad override or folder fails the same way
twice, and a run of hours should not silently start again.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.data.data_root import FolderError
from face_emotions.jobs import training_runs as db_runs
from face_emotions.jobs.database import with_db_retry
from face_emotions.jobs.schema import TrainingRun
from face_emotions.jobs.schema import TrainingRunStatus
from face_emotions.settings import Settings
from face_emotions.training_config import OverrideError
from face_emotions.training_config import check_run_config
from training.progress import RunHooks

log = logging.getLogger(__name__)

TrainFn = Callable[[DictConfig, RunHooks], Any]


class RunConfigError(ValueError):
    """The run can't be configured here (its folder, its overrides); the message says why."""


def output_dir(settings: Settings, run_id: uuid.UUID) -> Path:
    return settings.var_dir / "runs" / str(run_id)


def run_config(run: TrainingRun, settings: Settings) -> DictConfig:
    """The run's configuration on this trainer: its overrides plus the service's own."""
    root = settings.resolved_data_root
    try:
        data_dir = db_runs.resolve_data_path(root, run.data_path)
    except FolderError as exc:
        raise RunConfigError(
            f"{exc.message} ({root}: this trainer's EMOTIONS_DATA_ROOT; the API and the "
            "trainer must share one)"
        ) from exc
    try:
        return check_run_config(
            list(run.overrides or []),
            data_dir=data_dir,
            output_dir=output_dir(settings, run.id),
            promote=run.promote,
        )
    except OverrideError as exc:
        raise RunConfigError(f"invalid training configuration: {exc}") from exc


def start_run(
    sessions: sessionmaker[Session], run_id: uuid.UUID, *, dispatch: str | None = None
) -> TrainingRun | None:
    """Move the run to ``running``; None when there is nothing to do (finished, cancelled, or
    ``dispatch`` is a stale copy's: see :func:`~face_emotions.jobs.training_runs.mark_running`)."""

    def write() -> TrainingRun | None:
        with sessions() as session:
            run = db_runs.mark_running(session, run_id, dispatch=dispatch)
            session.commit()
            return run

    return with_db_retry(write)


def train_and_record(
    run_id: uuid.UUID,
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    train: TrainFn,
    announce: Callable[[], None] | None = None,
) -> str:
    """Train the (running) run and record how it ended; returns the final status."""
    with sessions() as session:
        run = db_runs.get_run(session, run_id)
    if run is None or run.status != TrainingRunStatus.RUNNING:
        return str(run.status) if run else "gone"
    linked: dict[str, str] = {}

    def mlflow_run_started(mlflow_run_id: str) -> None:
        linked["id"] = mlflow_run_id
        _write(sessions, lambda s: db_runs.record_mlflow_run(s, run_id, mlflow_run_id))

    def report(progress: dict[str, Any]) -> None:
        _write(sessions, lambda s: db_runs.report_progress(s, run_id, progress))

    hooks = RunHooks(announce=announce, report=report, mlflow_run_started=mlflow_run_started)
    try:
        result = train(run_config(run, settings), hooks)
    except Exception as exc:
        if _cancel_requested(sessions, run_id):
            # Stopped by the supervisor because an admin cancelled: it records the outcome.
            log.info("training run %s stopped: it was cancelled (%s)", run_id, exc)
            return "cancelled"
        if not isinstance(exc, RunConfigError):
            log.exception("training run %s failed", run_id)
        record_failure(sessions, run_id, failure_message(exc), mlflow_run_id=linked.get("id"))
        return "failed"
    _write(sessions, lambda s: db_runs.mark_succeeded(s, run_id, **outcome(result)))
    log.info(
        "training run %s succeeded: version %s, %s",
        run_id,
        result.version.version if result.version else None,
        result.promotion.summary() if result.promotion else "not registered",
    )
    return "succeeded"


def record_failure(
    sessions: sessionmaker[Session],
    run_id: uuid.UUID,
    message: str,
    *,
    mlflow_run_id: str | None = None,
) -> None:
    try:
        _write(
            sessions, lambda s: db_runs.mark_failed(s, run_id, message, mlflow_run_id=mlflow_run_id)
        )
    except Exception:
        # Nothing else to do: the row stays "running", and the supervisor says why it ended.
        log.exception("training run %s: could not record the failure %r", run_id, message)


def outcome(result: Any) -> dict[str, Any]:
    """What the row keeps of a ``TrainingResult``: ids, the decision and the test metrics."""
    summary = result.summary()
    metrics = {key: value for key, value in summary.items() if key.startswith("test_")}
    metrics["passed_targets"] = bool(summary.get("passed_targets"))
    promotion = result.promotion
    return {
        "mlflow_run_id": result.run_id,
        "registered_version": result.version.version if result.version else None,
        "promoted": bool(promotion and promotion.promote),
        "promotion_reason": promotion.summary() if promotion else None,
        "metrics": metrics,
    }


def failure_message(exc: BaseException) -> str:
    if isinstance(exc, RunConfigError):
        return str(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _cancel_requested(sessions: sessionmaker[Session], run_id: uuid.UUID) -> bool:
    try:
        with sessions() as session:
            return db_runs.cancel_requested(session, run_id)
    except Exception:  # the database is away: report the failure as it is
        return False


def _write(sessions: sessionmaker[Session], change: Callable[[Session], object]) -> None:
    def write() -> None:
        with sessions() as session:
            change(session)
            session.commit()

    with_db_retry(write)
