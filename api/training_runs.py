"""``/api/v1/training-runs``: ask the trainer service for a run, follow it (admin only).

Submission mirrors jobs: validate, commit the run, then send its task. A broker outage after the
commit leaves a queued run that was never dispatched; the workers' recovery sweeper (or the next
submission, or the next trainer to start) sends it once the broker is back, so the client still
gets its run id and nothing is lost.

The request's fields become Hydra overrides (``model=...``, ``training.max_epochs=...``) stored
with the run; the trainer adds what only it may choose (data path under its data root, output
directory, ``promote``).
"""

from __future__ import annotations

import logging
import uuid
from datetime import UTC
from datetime import datetime
from typing import Any

from apiflask import APIBlueprint
from flask import url_for
from sqlalchemy.orm import Session

from api.auth import ADMIN
from api.auth import current_principal
from api.auth import require_role
from api.errors import ApiError
from api.extensions import db_session
from api.extensions import services
from api.openapi_docs import error_responses
from api.schemas.common import PageQuery
from api.schemas.common import clamp_page
from api.schemas.training_runs import TrainingRunCreatedOut
from api.schemas.training_runs import TrainingRunIn
from api.schemas.training_runs import TrainingRunOut
from api.schemas.training_runs import TrainingRunPageOut
from api.serialize import aware
from face_emotions.data.data_root import FolderError
from face_emotions.jobs import training_runs as db_runs
from face_emotions.jobs import worker_heartbeats
from face_emotions.jobs.broker import TrainingSender
from face_emotions.jobs.schema import TrainingRun
from face_emotions.jobs.schema import TrainingRunStatus
from face_emotions.settings import Settings
from face_emotions.training_config import OverrideError
from face_emotions.training_config import check_run_config

log = logging.getLogger(__name__)

bp = APIBlueprint("training_runs", __name__, url_prefix="/api/v1/training-runs", tag="training")

BROKER_WARNING = (
    "queued in the database but not sent to a trainer: the broker is unreachable; the recovery "
    "sweeper sends it once the broker is back (within EMOTIONS_SWEEP_SECONDS), as do the next "
    "submission and a starting trainer"
)


def training_sender() -> TrainingSender:
    """The app's queue, if it can send training runs (a test's job-only fake can't)."""
    queue = services().broker
    if not isinstance(queue, TrainingSender):
        raise ApiError(503, "training_unavailable", "this server has no training queue configured")
    return queue


@bp.post("")
@require_role(ADMIN)
@bp.input(TrainingRunIn, arg_name="body")
@bp.output(TrainingRunCreatedOut, status_code=202, description="Run accepted and queued")
@bp.doc(
    responses=error_responses(
        {400: "Invalid input", 503: "Training is not available on this server"}, auth=True
    )
)
def create_training_run(body: dict[str, Any]) -> Any:
    """Start a training run

    The trainer service trains on `data` (a labelled folder under EMOTIONS_DATA_ROOT),
    evaluates on the held-out test split, registers a new version in MLflow and applies
    `promote`. `model` and `epochs` become the Hydra overrides `model=...` and
    `training.max_epochs=...`; `overrides` adds more (data.path, promote, output_dir and
    hydra.* are set by the service). Follow the run at the `Location` it answers with.
    """
    state = services()
    queue = training_sender()
    folder = body["data"].strip()
    try:
        data_root = state.settings.resolved_data_root
    except ValueError as exc:  # an object-store root: training reads local folders only
        raise ApiError(
            503, "training_unavailable", f"training needs a local data root: {exc}"
        ) from exc
    try:
        db_runs.resolve_data_path(data_root, folder)
    except FolderError as exc:
        raise ApiError(400, exc.code, f"data: {exc.message}") from exc

    overrides: list[str] = []
    if "model" in body:
        overrides.append(f"model={body['model']}")
    if "epochs" in body:
        overrides.append(f"training.max_epochs={body['epochs']}")
    overrides += body["overrides"]
    try:  # composed as the trainer will compose it: what it would refuse is refused now
        check_run_config(
            overrides,
            data_dir=db_runs.resolve_data_path(data_root, folder),
            output_dir=state.settings.var_dir / "runs" / "check",
            promote=body["promote"],
        )
    except OverrideError as exc:
        raise ApiError(400, "invalid_overrides", f"overrides: {exc}") from exc

    session = db_session()
    run = db_runs.create_run(
        session,
        data_path=folder,
        overrides=overrides,
        promote=body["promote"],
        requested_by=current_principal().id,
    )
    # Committed before anything is sent: a trainer must find the row its task names.
    session.commit()
    sent, error = db_runs.dispatch_pending(state.sessions, queue.send_training_run)
    payload = run_dict(db_runs.get_run(session, run.id) or run)
    warnings = [] if run.id in sent else [BROKER_WARNING]
    if run.id not in sent:
        log.warning("training run %s left queued for later dispatch: %s", run.id, error)
    trainers = trainer_problem(session, state.settings)
    if trainers is not None:
        warnings.append(trainers)
    if warnings:
        payload["warning"] = "; ".join(warnings)
    log.info("training run %s: data %r, overrides %s", run.id, folder, overrides)
    return payload, 202, {"Location": url_for("training_runs.get_training_run", run_id=run.id)}


@bp.get("")
@require_role(ADMIN)
@bp.input(PageQuery, location="query", arg_name="query")
@bp.output(TrainingRunPageOut)
@bp.doc(responses=error_responses({}, auth=True))
def list_training_runs(query: dict[str, int]) -> dict[str, Any]:
    """List training runs, newest first

    `limit` is clamped to 1..EMOTIONS_MAX_PAGE_SIZE and `page` to >= 1.
    """
    page, limit = clamp_page(query, services().settings.max_page_size)
    runs, total = db_runs.list_runs(db_session(), offset=(page - 1) * limit, limit=limit)
    return {"items": [run_dict(run) for run in runs], "page": page, "limit": limit, "total": total}


@bp.get("/<uuid:run_id>")
@require_role(ADMIN)
@bp.output(TrainingRunOut)
@bp.doc(responses=error_responses({404: "Training run not found"}, auth=True))
def get_training_run(run_id: uuid.UUID) -> dict[str, Any]:
    """Status, progress, MLflow run, test metrics, registered version and promotion of a run"""
    run = db_runs.get_run(db_session(), run_id)
    if run is None:
        raise ApiError(404, "not_found", f"no training run {run_id}")
    return run_dict(run)


@bp.delete("/<uuid:run_id>")
@require_role(ADMIN)
@bp.output(TrainingRunOut, status_code=202, description="Cancelled, or being stopped")
@bp.doc(
    responses=error_responses(
        {404: "Training run not found", 409: "The run has finished already"}, auth=True
    )
)
def cancel_training_run(run_id: uuid.UUID) -> Any:
    """Cancel a queued or running run

    A queued run is cancelled at once. A running one is stopped by its trainer within a few
    seconds (its process and data loaders end, its MLflow run is marked KILLED, nothing is
    registered); until then the answer says `running` with `cancel_requested: true`.
    """
    session = db_session()
    status = db_runs.request_cancel(session, run_id)
    session.commit()
    if status is None:
        raise ApiError(404, "not_found", f"no training run {run_id}")
    run = db_runs.get_run(session, run_id)
    assert run is not None
    if status not in (TrainingRunStatus.CANCELLED, TrainingRunStatus.RUNNING):
        raise ApiError(409, "finished", f"training run {run_id} has finished already ({status})")
    log.info("training run %s: cancel requested (%s)", run_id, status)
    return run_dict(run), 202


def trainer_problem(session: Session, settings: Settings) -> str | None:
    """Why a queued run would not start now, or None: no live trainer, or trainers that read
    another data root than this API checks folders against."""
    trainers = worker_heartbeats.live_workers(
        session, role=worker_heartbeats.TRAINING, stale_seconds=settings.worker_stale_seconds
    )
    if not trainers:
        return (
            f"no trainer is consuming queue '{settings.training_queue}': the run stays queued "
            "until one starts (celery -A training.service worker -Q training)"
        )
    try:
        ours = str(settings.resolved_data_root)
    except ValueError:
        return None
    other = sorted({t.data_root for t in trainers if t.data_root and t.data_root != ours})
    if other and len(other) == len({t.data_root for t in trainers}):
        return (
            "every live trainer reads another data root than this API "
            "(EMOTIONS_DATA_ROOT differs between services): the run will not find its folder"
        )
    return None


def run_dict(run: TrainingRun, *, now: datetime | None = None) -> dict[str, Any]:
    """A row in the documented shape of :class:`TrainingRunOut`."""
    started, finished = aware(run.started_at), aware(run.finished_at)
    duration: float | None = None
    if started is not None:
        end = finished or now or datetime.now(UTC)
        duration = round(max((end - started).total_seconds(), 0.0), 3)
    return {
        "id": str(run.id),
        "status": str(run.status),
        "requested_by": run.requested_by,
        "data": run.data_path,
        "promote": run.promote,
        "overrides": list(run.overrides or []),
        "attempts": run.attempts,
        "mlflow_run_id": run.mlflow_run_id,
        "registered_version": run.registered_version,
        "promoted": bool(run.promoted),
        "promotion_reason": run.promotion_reason,
        "metrics": run.metrics,
        "error": run.error,
        "progress": run.progress,
        "cancel_requested": run.cancel_requested_at is not None,
        "created_at": aware(run.created_at),
        "started_at": started,
        "finished_at": finished,
        "duration_seconds": duration,
        "links": {"self": url_for("training_runs.get_training_run", run_id=run.id)},
    }
