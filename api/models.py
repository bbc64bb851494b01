"""``/api/v1/models``: which versions are registered, which is champion, what workers serve.

Versions come from the MLflow registry; workers from their heartbeat rows in the jobs
database, so the page shows what is actually live (a promotion is visible here as workers
move to the new version) and not only what the alias says. ``POST .../<v>/promote`` (admin)
moves the serving alias and broadcasts a reload so workers swap at their next micro-batch.
``POST /api/v1/models`` (admin) imports an ONNX model made elsewhere;
``GET .../<v>/artifact`` gives any version back as a zip of ``model.onnx`` and ``spec.yaml``.
"""

from __future__ import annotations

import io
import logging
import tempfile
import zipfile
from datetime import UTC
from datetime import datetime
from datetime import timedelta
from pathlib import Path
from typing import Any

from apiflask import APIBlueprint
from flask import Response
from flask import request

from api.auth import ADMIN
from api.auth import SUBMIT
from api.auth import require_role
from api.errors import ApiError
from api.extensions import db_session
from api.extensions import services
from api.openapi_docs import error_responses
from api.schemas.models import EvaluationOut
from api.schemas.models import ImportOut
from api.schemas.models import ModelsOut
from api.schemas.models import PromoteOut
from api.serialize import aware
from face_emotions.jobs import worker_heartbeats
from face_emotions.jobs.broker import TrainingSender
from face_emotions.jobs.schema import WorkerState
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.int8 import TAG_INT8
from face_emotions.registry.mlflow_registry import TAG_ARCHITECTURE
from face_emotions.registry.mlflow_registry import TAG_IMAGE_SIZE
from face_emotions.registry.mlflow_registry import RegistryError
from face_emotions.registry.mlflow_registry import VersionInfo
from face_emotions.registry.promotion import PromoteMode
from face_emotions.registry.promotion import promote
from face_emotions.serving.model_export import export_version
from face_emotions.serving.model_import import import_model

log = logging.getLogger(__name__)

bp = APIBlueprint("models", __name__, url_prefix="/api/v1/models", tag="models")

#: MLflow's code for "no such version"; any other registry failure means it is unreachable.
MISSING_VERSION_CODES = {"RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"}

#: Registries number versions from 1 in a 32-bit integer; larger numbers exist nowhere.
MAX_VERSION = 2**31 - 1

REGISTRY_UNREACHABLE: dict[int, str] = {503: "The model registry is unreachable"}


@bp.get("")
@require_role(SUBMIT)
@bp.output(ModelsOut)
@bp.doc(responses=error_responses(REGISTRY_UNREACHABLE))
def list_models() -> dict[str, Any]:
    """Registered model versions, the champion, and the live workers and trainers

    Readable by submit tokens: clients choose `model_version` from it.
    """
    state = services()
    try:
        registry = state.registry()
        versions = registry.list_versions()
    except Exception as exc:
        log.warning("model registry unreachable: %s", exc)
        raise _registry_unavailable() from exc
    alias = state.settings.model_alias
    champion = next((v.version for v in versions if alias in v.aliases), None)
    # Processes heartbeat while idle too; one silent for the stale time is gone (or stuck).
    stale_seconds = state.settings.worker_stale_seconds
    since = datetime.now(UTC) - timedelta(seconds=stale_seconds)
    live = worker_heartbeats.live_workers(db_session(), since=since)
    return {
        "model": getattr(registry, "model_name", state.settings.model_name),
        "champion": champion,
        "versions": [_version_dict(v) for v in versions],
        "workers": [_worker_dict(w) for w in live if w.role == worker_heartbeats.INFERENCE],
        "trainers": [_worker_dict(w) for w in live if w.role == worker_heartbeats.TRAINING],
        "worker_stale_seconds": stale_seconds,
    }


def _worker_dict(worker: WorkerState) -> dict[str, Any]:
    return {
        "name": worker.name,
        "model_version": worker.model_version,
        "device": worker.device,
        "backend": worker.backend,
        "state": worker.state,
        "images_processed": worker.images_processed,
        "last_seen": aware(worker.last_seen),
    }


@bp.get("/<int:version>/evaluation")
@require_role(SUBMIT)
@bp.output(EvaluationOut)
@bp.doc(
    responses=error_responses(
        {404: "No such version, or it has no recorded evaluation", **REGISTRY_UNREACHABLE}
    )
)
def model_evaluation(version: int) -> dict[str, Any]:
    """Test-split evaluation of a version: confusion matrix and per-class metrics

    The report training logged with the version's MLflow run (`evaluation/evaluation.json`).
    Rows of `confusion_matrix` are true classes, columns predicted ones, both in `classes`
    order. Versions registered without a training run's report answer 404.
    """
    if version < 1 or version > MAX_VERSION:
        raise ApiError(404, "not_found", f"model has no version {version}")
    try:
        report = services().registry().evaluation(version)
    except Exception as exc:
        raise _registry_error(exc, version) from exc
    if report is None:
        raise ApiError(404, "no_evaluation", f"version {version} has no recorded evaluation")
    return {
        "version": version,
        "classes": report.get("classes") or list(EMOTIONS),
        "confusion_matrix": report["confusion_matrix"],
        "num_images": report["num_images"],
        "accuracy": report["accuracy"],
        "weighted_f1": report["weighted_f1"],
        "macro_f1": report["macro_f1"],
        "per_class": report.get("per_class") or {},
        "passed": report.get("passed"),
        "failures": report.get("failures") or [],
    }


@bp.post("/<int:version>/promote")
@require_role(ADMIN)
@bp.output(PromoteOut, description="The serving alias now points at this version")
@bp.doc(responses=error_responses({404: "No such version", **REGISTRY_UNREACHABLE}, auth=True))
def promote_model(version: int) -> dict[str, Any]:
    """Make a version the one workers serve

    Moves the serving alias (`champion`) to `version` whatever its metrics (a training run's
    `promote=auto` is the guarded path) and broadcasts a reload, so running workers swap to it
    at their next micro-batch; workers that miss the broadcast still pick it up at their next
    poll (EMOTIONS_MODEL_REFRESH_SECONDS). Admin tokens only.
    """
    if version < 1 or version > MAX_VERSION:
        raise ApiError(404, "not_found", f"model has no version {version}")
    state = services()
    try:
        registry = state.registry()
        decision = promote(
            registry, registry.get_version(version), PromoteMode.FORCE, announce=_announce
        )
    except Exception as exc:
        raise _registry_error(exc, version) from exc
    return {"version": version, "previous": decision.previous, "alias": state.settings.model_alias}


@bp.post("")
@require_role(ADMIN)
@bp.output(ImportOut, status_code=201, description="The model was registered as a version")
@bp.doc(
    responses=error_responses(
        {400: "The model or its spec was refused (one line says why)", **REGISTRY_UNREACHABLE},
        auth=True,
    )
)
def import_onnx_model() -> dict[str, Any]:
    """Import an ONNX expression model trained elsewhere as a new version

    multipart/form-data: `model` (the .onnx file), `spec` (the YAML spec, as a file or a text
    field), optional `eval_folder` (a labelled folder under EMOTIONS_DATA_ROOT to evaluate it
    on) and `promote` (`auto`, the default: only when it beats the champion on `eval_folder`;
    `never`; `force`). Checks run before anything is registered: the file loads in ONNX
    Runtime, is at most EMOTIONS_MAX_IMPORT_MB, its input and output shapes agree with the
    spec, a probe batch gives finite outputs, the labels cover the five classes. Admin only.
    """
    from face_emotions.modeling.import_spec import ImportRefused
    from face_emotions.modeling.import_spec import load_spec_text

    state = services()
    upload = request.files.get("model")
    if upload is None or not upload.filename:
        raise ApiError(400, "no_model", "upload the ONNX file in field 'model'")
    spec_file = request.files.get("spec")
    spec_text = spec_file.read() if spec_file is not None else request.form.get("spec")
    if not spec_text:
        raise ApiError(400, "no_spec", "send the YAML spec in field 'spec' (file or text)")
    mode = request.form.get("promote", "auto")
    if mode not in {m.value for m in PromoteMode}:
        raise ApiError(400, "bad_request", "promote must be auto, never or force")
    limit = state.settings.max_import_mb * 2**20
    try:
        spec = load_spec_text(spec_text)
        eval_folder = _eval_folder(request.form.get("eval_folder"))
        with tempfile.TemporaryDirectory(prefix="api-import-") as staging:
            path = Path(staging) / "model.onnx"
            with path.open("wb") as out:
                # One byte past the limit is enough for the check to refuse it by size.
                copied = 0
                while copied <= limit and (block := upload.stream.read(1 << 20)):
                    out.write(block)
                    copied += len(block)
            outcome = import_model(
                state.registry(),
                path,
                spec,
                eval_folder=eval_folder,
                promote_mode=mode,
                announce=_announce,
                max_import_mb=state.settings.max_import_mb,
            )
    except ImportRefused as exc:
        raise ApiError(400, "import_refused", str(exc)) from exc
    except ApiError:
        raise
    except Exception as exc:
        log.warning("model import failed: %s", exc)
        raise _registry_unavailable() from exc
    return {
        "version": outcome.version.version,
        "source": "imported",
        "label_mapping": outcome.mapping.to_dict(),
        "onnx_sha256": outcome.version.tags.get("onnx_sha256", ""),
        "evaluation": outcome.report.to_dict() if outcome.report is not None else None,
        "promoted": outcome.decision.promote,
        "promotion": outcome.decision.summary(),
    }


def _eval_folder(folder: str | None) -> Path | None:
    """A folder under EMOTIONS_DATA_ROOT (local data roots only), confined to it."""
    from face_emotions.data.data_root import FolderError
    from face_emotions.data.data_root import resolve_local_folder
    from face_emotions.data.storage import is_remote
    from face_emotions.data.storage import local_path

    if not folder:
        return None
    data_root = services().settings.data_root
    if not data_root or is_remote(data_root):
        raise ApiError(400, "bad_request", "eval_folder needs a local EMOTIONS_DATA_ROOT")
    try:
        _, candidate = resolve_local_folder(Path(local_path(data_root) or data_root), folder)
    except FolderError as exc:
        raise ApiError(400, exc.code, exc.message) from exc
    return candidate


@bp.get("/<int:version>/artifact")
@require_role(ADMIN)
@bp.doc(
    responses={
        200: {
            "description": "A zip of model.onnx and spec.yaml",
            "content": {"application/zip": {}},
        },
        **error_responses({404: "No such version", **REGISTRY_UNREACHABLE}, auth=True),
    }
)
def model_artifact(version: int) -> Response:
    """Download a version as its ONNX file plus the spec that feeds it

    A zip with `model.onnx` and `spec.yaml` (the format `POST /api/v1/models` and
    `face-emotions models import` take), for trained and imported versions alike. Admin only.
    """
    if version < 1 or version > MAX_VERSION:
        raise ApiError(404, "not_found", f"model has no version {version}")
    try:
        with tempfile.TemporaryDirectory(prefix="api-export-") as staging:
            exported = export_version(services().registry(), version, Path(staging))
            buffer = io.BytesIO()
            with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
                archive.write(exported.onnx_path, "model.onnx")
                archive.write(exported.spec_path, "spec.yaml")
    except Exception as exc:
        raise _registry_error(exc, version) from exc
    return Response(
        buffer.getvalue(),
        mimetype="application/zip",
        headers={"Content-Disposition": f'attachment; filename="face-emotion-v{version}.zip"'},
    )


def _registry_error(exc: Exception, version: int) -> ApiError:
    """404 for a version the registry does not have, 503 for a registry that can't answer."""
    if isinstance(exc, RegistryError) and _missing_version(exc):
        return ApiError(404, "not_found", f"model has no version {version}")
    log.warning("model registry unreachable: %s", exc)
    return _registry_unavailable()


def _registry_unavailable() -> ApiError:
    return ApiError(
        503, "registry_unavailable", "the model registry is unreachable; try again later"
    )


def _missing_version(exc: RegistryError) -> bool:
    """``Registry.get_version`` wraps every MLflow error; only some mean "no such version"."""
    cause = exc.__cause__
    if cause is None:
        return True
    return getattr(cause, "error_code", None) in MISSING_VERSION_CODES


def _announce() -> None:
    """Best effort: a lost broadcast only delays the swap until the workers' next poll."""
    broker = services().broker
    if not isinstance(broker, TrainingSender):
        log.info("no broadcast channel configured; workers pick the version up when they poll")
        return
    try:
        broker.broadcast_reload()
    except Exception as exc:
        log.warning("could not broadcast the model reload (workers will poll): %s", exc)


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
        "int8": _int8_dict(version),
    }


def _int8_dict(version: VersionInfo) -> dict[str, Any]:
    tags = version.tags
    return {
        "gate": tags.get(TAG_INT8, "none"),
        "accuracy_drop": _float_or_none(tags.get("int8_accuracy_drop")),
        "agreement": _float_or_none(tags.get("int8_agreement")),
        "worst_recall_drop": _float_or_none(tags.get("int8_worst_recall_drop")),
        "failures": tags.get("int8_failures") or None,
    }


def _float_or_none(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
