"""The trainer's task: start a run's process, watch it, stop it when an admin cancels.

The task itself only starts the run (``running``), checks that it can be configured here (so a
bad folder or override fails in a second, with the reason), and starts
:mod:`training.run_process`. While that process trains, the task checks every couple of seconds
whether the run was cancelled; then it stops the whole process group (the run's DataLoader
workers too), marks the run ``cancelled`` and its MLflow run ``KILLED``. A process that ends
without recording an outcome (killed by the kernel for memory, say) fails the run with how it
ended.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from typing import Protocol

from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs import training_runs as db_runs
from face_emotions.jobs.schema import TrainingRunStatus
from face_emotions.settings import Settings
from training.run_record import RunConfigError
from training.run_record import output_dir
from training.run_record import record_failure
from training.run_record import run_config
from training.run_record import start_run

log = logging.getLogger(__name__)

#: How often a running run's cancel flag is read.
POLL_SECONDS = 2.0
#: How long a stopped run may take to exit before it is killed.
STOP_GRACE_SECONDS = 15.0


class RunProcess(Protocol):
    def wait(self, timeout: float) -> int | None:
        """The exit code, or None if still running after ``timeout`` seconds."""

    def stop(self) -> None:
        """End the run's process and everything it started."""


Launch = Callable[[uuid.UUID], RunProcess]


class ChildProcess:
    """``python -m training.run_process RUN_ID`` in a session of its own."""

    def __init__(self, run_id: uuid.UUID) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "training.run_process", str(run_id)],
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            preexec_fn=_die_with_supervisor if sys.platform == "linux" else None,
        )

    def wait(self, timeout: float) -> int | None:
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """SIGTERM to the whole session (the run and its DataLoader workers), SIGKILL to what
        is left after the grace period; returns once none of them is left."""
        group = self.popen.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        while time.monotonic() < deadline:
            self.wait(0.2)  # reaps the run's own process once it exits
            if not _group_alive(group):
                return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        self.popen.wait()
        while _group_alive(group):
            time.sleep(0.1)


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - a group of another user: it exists
        return True
    return True


def _die_with_supervisor() -> None:
    """In the run's process, before it starts: the kernel sends it SIGTERM if the task that
    watches it dies (a trainer killed for good), so no run trains on unwatched. The broker then
    hands the run to the next trainer, which restarts it."""
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def supervise(
    run_id: uuid.UUID,
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    launch: Launch = ChildProcess,
    poll_seconds: float = POLL_SECONDS,
    dispatch: str | None = None,
) -> str | None:
    """Run ``run_id`` to its end; returns its final status (None: nothing to do).

    ``dispatch`` is the message's dispatch stamp: a second copy of a run that was sent twice
    finds it is not the current one and does nothing, so the run trains once.
    """
    run = start_run(sessions, run_id, dispatch=dispatch)
    if run is None:
        log.info(
            "training run %s is finished, cancelled, gone or started by another copy of its "
            "task; nothing to do",
            run_id,
        )
        return None
    log.info("training run %s: attempt %d", run_id, run.attempts)
    try:
        run_config(run, settings)
    except RunConfigError as exc:
        log.warning("training run %s: %s", run_id, exc)
        record_failure(sessions, run_id, str(exc))
        return "failed"
    # A restarted run must not pick up the dead attempt's checkpoints as its own.
    shutil.rmtree(output_dir(settings, run_id), ignore_errors=True)

    process = launch(run_id)
    while (code := process.wait(poll_seconds)) is None:
        if _cancel_requested(sessions, run_id):
            log.info("training run %s: cancelled, stopping its process", run_id)
            # The run's process sees its training fail and leaves the record to us; the run
            # reads "cancelled" only once nothing of it is left running.
            process.stop()
            return _finish_cancelled(sessions, run_id, settings)

    with sessions() as session:
        finished = db_runs.get_run(session, run_id)
    if finished is not None and finished.status == TrainingRunStatus.RUNNING:
        if finished.cancel_requested_at is not None:
            return _finish_cancelled(sessions, run_id, settings)
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        record_failure(
            sessions,
            run_id,
            f"the training process {how} without recording an outcome (see the trainer's log)",
            mlflow_run_id=finished.mlflow_run_id,
        )
        return "failed"
    return str(finished.status) if finished is not None else None


def _cancel_requested(sessions: sessionmaker[Session], run_id: uuid.UUID) -> bool:
    try:
        with sessions() as session:
            return db_runs.cancel_requested(session, run_id)
    except Exception as exc:  # the database is away: keep training, ask again later
        log.warning("training run %s: cannot read its cancel flag: %s", run_id, exc)
        return False


def _finish_cancelled(
    sessions: sessionmaker[Session], run_id: uuid.UUID, settings: Settings
) -> str:
    """MLflow's run is marked KILLED before the row says ``cancelled``: whoever reads the
    cancel as done finds everything done."""
    with sessions() as session:
        mlflow_run_id = (run := db_runs.get_run(session, run_id)) and run.mlflow_run_id
    if mlflow_run_id:
        try:
            from face_emotions.registry.mlflow_registry import Registry

            Registry(settings).client.set_terminated(mlflow_run_id, status="KILLED")
        except Exception as exc:
            log.warning(
                "training run %s: MLflow run %s not marked KILLED: %s", run_id, mlflow_run_id, exc
            )
    with sessions() as session:
        db_runs.mark_cancelled(session, run_id, "cancelled by an admin")
        session.commit()
    return "cancelled"
