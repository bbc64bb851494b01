"""``/api/v1/models``: which versions are registered, which is champion, what workers serve.

Versions come from the MLflow registry; workers from their heartbeat rows in the jobs
database, so the page shows what is actually live (a promotion is visible here as workers
move to the new version) and not only what the alias says.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Any

from apiflask import APIBlueprint

from api.errors import ApiError
from api.extensions import db_session, services
from api.schemas import ErrorOut, ModelsOut
from api.serialize import aware
from human_face_emotions.db import jobs as db_jobs
from human_face_emotions.registry import TAG_ARCHITECTURE, TAG_IMAGE_SIZE, VersionInfo

log = logging.getLogger(__name__)

bp = APIBlueprint("models", __name__, url_prefix="/api/v1/models", tag="models")

#: Workers heartbeat far more often; one silent this long is gone (or stuck).
WORKER_LIVENESS = timedelta(minutes=5)


@bp.get("")
@bp.output(ModelsOut)
@bp.doc(
    responses={
        503: {
            "description": "The model registry is unreachable",
            "content": {"application/json": {"schema": ErrorOut}},
        }
    }
)
def list_models() -> dict[str, Any]:
    """Registered model versions, the champion, and the workers seen in the last 5 minutes"""
    state = services()
    try:
        registry = state.registry()
        versions = registry.list_versions()
    except Exception as exc:
        log.warning("model registry unreachable: %s", exc)
        raise ApiError(
            503, "registry_unavailable", "the model registry is unreachable; try again later"
        ) from exc
    alias = state.settings.model_alias
    champion = next((v.version for v in versions if alias in v.aliases), None)
    since = datetime.now(UTC) - WORKER_LIVENESS
    workers = db_jobs.live_workers(db_session(), since=since)
    return {
        "model": getattr(registry, "model_name", state.settings.model_name),
        "champion": champion,
        "versions": [_version_dict(v) for v in versions],
        "workers": [
            {
                "name": w.name,
                "model_version": w.model_version,
                "device": w.device,
                "backend": w.backend,
                "images_processed": w.images_processed,
                "last_seen": aware(w.last_seen),
            }
            for w in workers
        ],
    }


def _version_dict(version: VersionInfo) -> dict[str, Any]:
    created = (
        datetime.fromtimestamp(version.created_ms / 1000, tz=UTC)
        if version.created_ms is not None
        else None
    )
    return {
        "version": version.version,
        "aliases": list(version.aliases),
        "architecture": version.tags.get(TAG_ARCHITECTURE),
        "image_size": _int_or_none(version.tags.get(TAG_IMAGE_SIZE)),
        "accuracy": version.metric("accuracy"),
        "weighted_f1": version.metric("weighted_f1"),
        "macro_f1": version.metric("macro_f1"),
        "created_at": created,
        "run_id": version.run_id,
    }


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
