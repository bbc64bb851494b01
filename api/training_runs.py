"""``/api/v1/training-runs``: ask the trainer service for a run, follow it (admin only).

Submission mirrors jobs: validate, commit the run, then send its task. A broker outage after the
commit leaves a queued run that was never dispatched; the next submission or the next trainer
to start sends it, so the client still gets its run id and nothing is lost.

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
from face_emotions.jobs.broker import TrainingSender
from face_emotions.jobs.schema import TrainingRun

log = logging.getLogger(__name__)

bp = APIBlueprint("training_runs", __name__, url_prefix="/api/v1/training-runs", tag="training")

BROKER_WARNING = (
    "queued in the database; the broker is unreachable, the run will be dispatched by the next "
    "submission or when a trainer starts"
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
    if run.id not in sent:
        payload["warning"] = BROKER_WARNING
        log.warning("training run %s left queued for later dispatch: %s", run.id, error)
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
    """Status, MLflow run, test metrics, registered version and promotion of a run"""
    run = db_runs.get_run(db_session(), run_id)
    if run is None:
        raise ApiError(404, "not_found", f"no training run {run_id}")
    return run_dict(run)


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
        "created_at": aware(run.created_at),
        "started_at": started,
        "finished_at": finished,
        "duration_seconds": duration,
        "links": {"self": url_for("training_runs.get_training_run", run_id=run.id)},
    }
