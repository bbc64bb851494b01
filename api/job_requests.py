"""Reading job requests: a submission's body, its idempotency key, a results filter.

``POST /api/v1/jobs`` takes multipart *or* JSON, which APIFlask's ``input`` (one location per
view) cannot parse, so the view reads the body here: the file parts become ``(filename,
stream)`` pairs and the options plain values, which :mod:`face_emotions.jobs.submission`
turns into a job without knowing about Flask. Everything refused here is refused before a byte
is stored.
"""

from __future__ import annotations

from typing import Any

from flask import request
from marshmallow import Schema
from marshmallow import ValidationError
from werkzeug.datastructures import FileStorage

from api.errors import ApiError
from api.errors import validation_message
from api.schemas.jobs import MAX_BATCH_SIZE
from api.schemas.jobs import JobFolderIn
from api.schemas.jobs import JobUploadForm
from face_emotions.jobs.intake import IntakeError
from face_emotions.jobs.intake import secure_name
from face_emotions.jobs.submission import FolderSource
from face_emotions.jobs.submission import JobOptions
from face_emotions.jobs.submission import JobSource
from face_emotions.jobs.submission import UploadSource
from face_emotions.labels import EMOTIONS
from face_emotions.labels import canonical_emotion
from face_emotions.settings import Settings

MAX_IDEMPOTENCY_KEY = 255
#: IntakeError codes that are not plain 400s.
INTAKE_STATUS: dict[str, int] = {"too_large": 413}

JSON_TYPES: frozenset[str] = frozenset({"application/json"})
MULTIPART = "multipart/form-data"
#: Declared content types a file part may have: images, zips, and what clients send when they
#: don't know (curl and requests send nothing or octet-stream for unknown extensions). Anything
#: else (text/html, text/plain, application/x-msdownload...) is refused before it is stored.
PART_TYPES: frozenset[str] = frozenset(
    {
        "",
        "application/octet-stream",
        "application/zip",
        "application/x-zip",
        "application/x-zip-compressed",
        "binary/octet-stream",
    }
)


def idempotency_key() -> str | None:
    """The request's ``Idempotency-Key``, or None; a blank or oversized key is a 400 rather
    than silently ignored, since the client relies on it to make retries safe."""
    raw = request.headers.get("Idempotency-Key")
    if raw is None:
        return None
    key = raw.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY:
        raise ApiError(
            400,
            "invalid_idempotency_key",
            f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY} characters",
        )
    return key


def read_job_source(settings: Settings) -> JobSource:
    """The uploaded files or the requested folder, with validated options; 415 for any other
    content type."""
    mimetype = request.mimetype
    if mimetype == MULTIPART:
        return _read_upload(settings)
    if mimetype in JSON_TYPES or mimetype.endswith("+json"):
        return _read_folder(settings)
    raise ApiError(
        415,
        "unsupported_media_type",
        "send multipart/form-data (field 'files': images or one .zip) or application/json "
        '({"folder": "..."})',
    )


def intake_error(exc: IntakeError) -> ApiError:
    """The core's refusal as an HTTP error: its code and message go to the client as they are."""
    return ApiError(INTAKE_STATUS.get(exc.code, 400), exc.code, exc.message)


def emotion_filter(value: str | None) -> str | None:
    """The canonical name of an emotion or alias; an unknown one is a 400, not an empty page."""
    if value is None or value == "":
        return None
    canonical = canonical_emotion(value)
    if canonical is None:
        raise ApiError(
            400,
            "invalid_emotion",
            f"unknown emotion {value!r}; valid emotions are {', '.join(EMOTIONS)}",
        )
    return canonical


def default_batch_size(settings: Settings) -> int:
    """The server's batch size, within what a request may ask for."""
    return min(settings.batch_size, MAX_BATCH_SIZE)


def _read_upload(settings: Settings) -> UploadSource:
    # Browsers send empty strings for untouched optional fields; treat them as absent.
    form = {key: value for key, value in request.form.items() if value.strip() != ""}
    options = _load_options(JobUploadForm(), form, "form")
    files: list[FileStorage] = [f for f in request.files.getlist("files") if f.filename]
    if not files:
        other = sorted(name for name in request.files if name != "files")
        hint = f" (got file fields {', '.join(other)})" if other else ""
        raise ApiError(400, "no_files", f"upload one or more images in field 'files'{hint}")
    _check_part_types(files)
    return UploadSource(
        files=[(f.filename or "", f.stream) for f in files],
        options=JobOptions(
            batch_size=options.get("batch_size", default_batch_size(settings)),
            model_version=options.get("model_version"),
            faces=options.get("faces") or settings.faces,
        ),
    )


def _read_folder(settings: Settings) -> FolderSource:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", 'the body must be a JSON object like {"folder": "..."}')
    options = _load_options(JobFolderIn(), payload, "json")
    return FolderSource(
        folder=options["folder"].strip(),
        recursive=options["recursive"],
        options=JobOptions(
            batch_size=options.get("batch_size", default_batch_size(settings)),
            model_version=options.get("model_version"),
            faces=options.get("faces") or settings.faces,
        ),
    )


def _load_options(schema: Schema, data: dict[str, Any], location: str) -> dict[str, Any]:
    """Validate like ``@bp.input`` would, with the same 400 ``validation_error`` body."""
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ApiError(
            400, "validation_error", validation_message({location: exc.messages})
        ) from exc


def _check_part_types(files: list[FileStorage]) -> None:
    """Refuse file parts whose declared type is neither an image nor a zip (nor unknown).

    The extension check in :func:`~face_emotions.jobs.intake.store_uploads` remains the main
    gate; this one stops a client that says outright that it sends HTML, text or an
    executable under an image name.
    """
    for upload in files:
        declared = (upload.mimetype or "").lower()
        if declared.startswith("image/") or declared in PART_TYPES:
            continue
        name = secure_name(upload.filename or "upload")
        raise ApiError(
            400,
            "unsupported_file",
            f"{name!r} is sent as {declared!r}; upload images (image/*) or one .zip",
        )
