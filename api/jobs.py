"""``/api/v1/jobs``: submit a batch, follow it, cancel it, read and export its results.

Every route needs a token with the ``submit`` role (admins too). A job belongs to the token that
submitted it: submit tokens see, list and cancel only their own jobs (another token's job is a
404, so its existence is not revealed), admins see all of them.

Submission order matters for failure handling: the request is validated and its files stored
first, then the job and all image rows are committed in one transaction, and only then are
chunk tasks sent. A crash before the commit leaves no job and (after cleanup) no files; a
broker outage after it leaves a queued job that the recovery sweeper dispatches later, so the
client still gets its job id and nothing is lost.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from apiflask import APIBlueprint
from flask import Response, current_app, request, url_for
from marshmallow import Schema, ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker
from werkzeug.datastructures import FileStorage

from api.auth import SUBMIT, current_principal, require_role
from api.errors import ApiError, validation_message
from api.extensions import db_session, services
from api.limits import check_backlog, submission_limits
from api.schemas import (
    MAX_BATCH_SIZE,
    MAX_INT32,
    ErrorOut,
    JobCreatedOut,
    JobCreateIn,
    JobFolderIn,
    JobOut,
    JobPageOut,
    JobUploadForm,
    PageQuery,
    ResultPageOut,
    ResultsQuery,
    SummaryOut,
)
from api.serialize import CSV_COLUMNS, csv_row, job_dict, model_versions_by_job, result_dict
from face_emotions.data.storage import Storage
from face_emotions.jobs import job_queries
from face_emotions.jobs.intake import (
    IntakeError,
    extract_zip,
    resolve_folder,
    secure_name,
    store_uploads,
)
from face_emotions.jobs.job_queries import NewImage
from face_emotions.jobs.schema import Image, Job
from face_emotions.labels import EMOTIONS, canonical_emotion
from face_emotions.ops.log_format import job_context
from face_emotions.settings import Settings

log = logging.getLogger(__name__)

bp = APIBlueprint("jobs", __name__, url_prefix="/api/v1/jobs", tag="jobs")

BROKER_WARNING = (
    "queued in the database; the broker is unreachable, the job will be dispatched when it recovers"
)
#: Images are already compressed, so an honest archive inflates little; this bounds what a
#: zip of ``max_upload_mb`` may expand to on disk.
ZIP_EXPANSION_LIMIT = 4
#: Keeps ``OFFSET`` inside a 64-bit integer whatever page a client asks for.
MAX_PAGE = 2**31 - 1
EXPORT_BATCH = 1000
MIB = 1024 * 1024
MAX_IDEMPOTENCY_KEY = 255
#: IntakeError codes that are not plain 400s.
INTAKE_STATUS = {"too_large": 413}

JSON_TYPES = {"application/json"}
MULTIPART = "multipart/form-data"
#: Declared content types a file part may have: images, zips, and what clients send when they
#: don't know (curl and requests send nothing or octet-stream for unknown extensions). Anything
#: else (text/html, text/plain, application/x-msdownload...) is refused before it is stored.
PART_TYPES = {
    "",
    "application/octet-stream",
    "application/zip",
    "application/x-zip",
    "application/x-zip-compressed",
    "binary/octet-stream",
}


def _error_responses(*codes: int) -> dict[int, dict[str, Any]]:
    descriptions = {
        400: "Invalid input",
        404: "Job not found",
        409: "Conflict",
        413: "Request body too large",
        415: "Unsupported content type",
        429: "Too many submissions for this token; see Retry-After",
        503: "Too many images are waiting (back-pressure); see Retry-After",
    }
    retry_after = {
        "Retry-After": {
            "description": "Seconds to wait before retrying",
            "schema": {"type": "integer"},
        }
    }
    return {
        code: {
            "description": descriptions[code],
            "content": {"application/json": {"schema": ErrorOut}},
            **({"headers": retry_after} if code in {429, 503} else {}),
        }
        for code in codes
    }


def document_body(schema: type[Schema], content_types: list[str]) -> Callable:
    """Document a request body that views parse themselves.

    ``POST /api/v1/jobs`` takes multipart *or* JSON; APIFlask's ``input`` parses a single
    location, so the view dispatches on the content type and this only fills the OpenAPI
    request body (the same ``_spec`` annotation ``input`` writes).
    """
    from apiflask.scaffold import _annotate

    def decorator(view: Callable) -> Callable:
        _annotate(view, body=schema(), content_type=content_types)
        return view

    return decorator


def document_request_bodies(spec: dict[str, Any]) -> dict[str, Any]:
    """Spec processor: one precise request schema per content type of ``POST /api/v1/jobs``.

    ``document_body`` can attach a single schema to both content types, which would tell
    clients (and fuzzers) that JSON takes ``files`` and multipart takes ``folder``. The two
    bodies are written here from the same constants the validating schemas use; a unit test
    keeps their field names in step with :class:`JobFolderIn` and :class:`JobUploadForm`.
    """
    post = spec.get("paths", {}).get("/api/v1/jobs", {}).get("post")
    if post is None:
        return spec
    batch_size = {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_BATCH_SIZE,
        "description": "Images per forward pass (default EMOTIONS_BATCH_SIZE).",
    }
    model_version = {
        "type": "integer",
        "minimum": 1,
        "maximum": MAX_INT32,
        "description": "Pin a registered version; default: the serving alias.",
    }
    content = post.setdefault("requestBody", {}).setdefault("content", {})
    content[MULTIPART] = {
        "schema": {
            "type": "object",
            "required": ["files"],
            "properties": {
                "files": {
                    "type": "array",
                    "items": {"type": "string", "format": "binary"},
                    "description": "Images (.png, .jpg...) or exactly one .zip of images.",
                },
                "batch_size": batch_size,
                "model_version": model_version,
            },
        }
    }
    content["application/json"] = {
        "schema": {
            "type": "object",
            "required": ["folder"],
            "additionalProperties": False,
            "properties": {
                "folder": {
                    "type": "string",
                    "example": "faces",
                    "description": "Folder relative to EMOTIONS_DATA_ROOT on the server.",
                },
                "recursive": {
                    "type": "boolean",
                    "default": True,
                    "description": "Include sub-folders.",
                },
                "batch_size": batch_size,
                "model_version": {**model_version, "nullable": True},
            },
        }
    }
    return spec


# -- submission ------------------------------------------------------------------------------


@dataclass
class Submission:
    source_type: str
    source: str
    images: list[NewImage]
    batch_size: int
    model_version: int | None
    skipped: int | None = None


@bp.post("")
@require_role(SUBMIT)
@bp.output(JobCreatedOut, status_code=202, description="Job accepted and queued")
@bp.doc(
    responses={
        200: {
            "description": "A job with this Idempotency-Key already exists: it is returned "
            "and nothing new is stored or queued",
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/JobOut"}}},
        },
        **_error_responses(400, 413, 415, 429, 503),
    }
)
@document_body(JobCreateIn, [MULTIPART, "application/json"])
def create_job() -> Any:
    """Submit a batch job

    multipart/form-data: `files` (one or more images, or exactly one .zip) and optional
    `batch_size` and `model_version` form fields. application/json: `{"folder": "<path under
    EMOTIONS_DATA_ROOT>", "recursive": true, "batch_size": 32, "model_version": 3}`.
    An `Idempotency-Key` header makes retries safe: the same key returns the same job (200)
    and does not count towards the rate limit (429). While more than
    EMOTIONS_MAX_QUEUED_IMAGES images wait, new jobs get 503 with `Retry-After`.
    """
    state = services()
    settings = state.settings
    session = db_session()
    owner = current_principal().id
    key = _idempotency_key()
    if key is not None:
        existing = job_queries.find_by_idempotency_key(session, owner, key)
        if existing is not None:
            return _job_payload(session, existing), 200, _location(existing.id)
    submission_limits(current_app).check_rate()
    # Refuse before reading the body when even a one-image job would not fit.
    check_backlog(session, settings, 1)
    session.commit()  # end the read transaction; the body may take a while to arrive

    job_id = uuid.uuid4()
    storage = Storage.from_url(
        settings.resolved_storage_url, s3_endpoint_url=settings.s3_endpoint_url
    )
    prefix = f"jobs/{job_id}"
    try:
        submission = _read_submission(settings, storage, prefix)
        job = job_queries.create_job(
            session,
            job_id=job_id,
            source_type=submission.source_type,
            source=submission.source,
            images=submission.images,
            batch_size=submission.batch_size,
            chunk_size=submission.batch_size * settings.chunk_batches,
            owner=owner,
            idempotency_key=key,
            model_version=submission.model_version,
        )
        session.commit()
    except IntegrityError:
        # Two requests with the same key raced past the lookup; the other one won.
        session.rollback()
        _remove_uploads(storage, prefix)
        existing = job_queries.find_by_idempotency_key(session, owner, key) if key else None
        if existing is None:
            raise
        return _job_payload(session, existing), 200, _location(existing.id)
    except BaseException:
        session.rollback()
        _remove_uploads(storage, prefix)
        raise

    payload = _job_payload(session, job, model_versions=[])
    if submission.skipped is not None:
        payload["skipped"] = submission.skipped
    if not _dispatch(session, job):
        payload["warning"] = BROKER_WARNING
    log.info(
        "job %s: %d images from %s %r, %d chunks",
        job.id,
        job.total,
        job.source_type,
        job.source,
        job.chunks,
        extra=job_context(job.id, model_version=job.model_version),
    )
    return payload, 202, _location(job.id)


def _remove_uploads(storage: Storage, prefix: str) -> None:
    """Delete a refused job's uploads; a failed cleanup is logged, never raised over the
    error that made it necessary (a leftover prefix holds no job and can be swept)."""
    try:
        storage.delete_prefix(prefix)
    except Exception as exc:
        log.warning("could not remove %s/%s: %s", storage.url, prefix, exc)


def _dispatch(session: Session, job: Job) -> bool:
    """Send one task per chunk; False when the broker refused (the job stays queued)."""
    queue = services().broker
    chunks = job_queries.chunk_image_ids(session, job.id)
    session.commit()  # end the read transaction before talking to the broker
    sent = 0
    try:
        for chunk in sorted(chunks):
            queue.send_chunk(str(job.id), chunks[chunk])
            sent += 1
    except Exception as exc:
        log.warning(
            "job %s: broker unreachable after %d/%d chunks, left queued for recovery: %s",
            job.id,
            sent,
            len(chunks),
            exc,
        )
        return False
    return True


def _idempotency_key() -> str | None:
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


def _read_submission(settings: Settings, storage: Storage, prefix: str) -> Submission:
    mimetype = request.mimetype
    try:
        if mimetype == MULTIPART:
            return _read_upload(settings, storage, prefix)
        if mimetype in JSON_TYPES or mimetype.endswith("+json"):
            return _read_folder(settings)
    except IntakeError as exc:
        raise ApiError(INTAKE_STATUS.get(exc.code, 400), exc.code, exc.message) from exc
    raise ApiError(
        415,
        "unsupported_media_type",
        "send multipart/form-data (field 'files': images or one .zip) or application/json "
        '({"folder": "..."})',
    )


def _load_options(schema: Schema, data: dict[str, Any], location: str) -> dict[str, Any]:
    try:
        return schema.load(data)
    except ValidationError as exc:
        raise ApiError(
            400, "validation_error", validation_message({location: exc.messages})
        ) from exc


def _default_batch_size(settings: Settings) -> int:
    return min(settings.batch_size, MAX_BATCH_SIZE)


def _read_upload(settings: Settings, storage: Storage, prefix: str) -> Submission:
    # Browsers send empty strings for untouched optional fields; treat them as absent.
    form = {key: value for key, value in request.form.items() if value.strip() != ""}
    options = _load_options(JobUploadForm(), form, "form")
    files: list[FileStorage] = [f for f in request.files.getlist("files") if f.filename]
    if not files:
        other = sorted(name for name in request.files if name != "files")
        hint = f" (got file fields {', '.join(other)})" if other else ""
        raise ApiError(400, "no_files", f"upload one or more images in field 'files'{hint}")
    _check_part_types(files)
    batch_size = options.get("batch_size", _default_batch_size(settings))
    model_version = options.get("model_version")
    zips = [f for f in files if (f.filename or "").lower().endswith(".zip")]
    if zips:
        if len(files) > 1:
            raise ApiError(
                400, "unsupported_file", "upload a .zip on its own, not together with other files"
            )
        archive = zips[0]
        extraction = extract_zip(
            archive.stream,
            storage,
            prefix,
            max_images=settings.max_images_per_job,
            max_total_bytes=settings.max_upload_mb * MIB * ZIP_EXPANSION_LIMIT,
        )
        # The count is known only now; create_job removes what was extracted if this refuses.
        check_backlog(db_session(), settings, len(extraction.images))
        return Submission(
            source_type="zip",
            source=secure_name(archive.filename or "upload.zip"),
            images=extraction.images,
            batch_size=batch_size,
            model_version=model_version,
            skipped=extraction.skipped,
        )
    if len(files) <= settings.max_images_per_job:  # else store_uploads says too_many_images
        check_backlog(db_session(), settings, len(files))
    images = store_uploads(
        ((f.filename or "", f.stream) for f in files),
        storage,
        prefix,
        max_images=settings.max_images_per_job,
    )
    return Submission(
        source_type="upload",
        source=f"{len(images)} file{'s' if len(images) != 1 else ''}",
        images=images,
        batch_size=batch_size,
        model_version=model_version,
    )


def _read_folder(settings: Settings) -> Submission:
    payload = request.get_json(silent=True)
    if not isinstance(payload, dict):
        raise ApiError(400, "invalid_json", 'the body must be a JSON object like {"folder": "..."}')
    options = _load_options(JobFolderIn(), payload, "json")
    folder = options["folder"].strip()
    images = resolve_folder(
        settings.data_root,
        folder,
        recursive=options["recursive"],
        max_images=settings.max_images_per_job,
        s3_endpoint_url=settings.s3_endpoint_url,
    )
    check_backlog(db_session(), settings, len(images))
    return Submission(
        source_type="folder",
        source=folder,
        images=images,
        batch_size=options.get("batch_size", _default_batch_size(settings)),
        model_version=options.get("model_version"),
    )


def _check_part_types(files: list[FileStorage]) -> None:
    """Refuse file parts whose declared type is neither an image nor a zip (nor unknown).

    The extension check in :func:`store_uploads` remains the main gate; this one stops a
    client that says outright that it sends HTML, text or an executable under an image name.
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


# -- reading jobs ----------------------------------------------------------------------------


@bp.get("")
@require_role(SUBMIT)
@bp.input(PageQuery, location="query")
@bp.output(JobPageOut)
def list_jobs(query_data: dict[str, int]) -> dict[str, Any]:
    """List jobs, newest first

    Submit tokens see their own jobs, admins every job. `limit` is clamped to
    1..EMOTIONS_MAX_PAGE_SIZE and `page` to 1..2^31-1 (a page past the end is empty).
    """
    page, limit = _page(query_data)
    session = db_session()
    owner = current_principal().owner_filter
    jobs, total = job_queries.list_jobs(
        session, owner=owner, offset=(page - 1) * limit, limit=limit
    )
    versions = model_versions_by_job(session, [job.id for job in jobs])
    return {
        "items": [job_dict(job, versions.get(job.id, [])) for job in jobs],
        "page": page,
        "limit": limit,
        "total": total,
    }


@bp.get("/<uuid:job_id>")
@require_role(SUBMIT)
@bp.output(JobOut)
@bp.doc(responses=_error_responses(404))
def get_job(job_id: uuid.UUID) -> dict[str, Any]:
    """Status, counts, progress, model versions used and timings of a job"""
    session = db_session()
    return _job_payload(session, _job_or_404(session, job_id))


@bp.delete("/<uuid:job_id>")
@require_role(SUBMIT)
@bp.output(JobOut, description="The cancelled job")
@bp.doc(responses=_error_responses(404, 409))
def cancel_job(job_id: uuid.UUID) -> dict[str, Any]:
    """Cancel a queued or running job

    Images already classified keep their results; chunks not yet started skip the job.
    """
    session = db_session()
    job = _job_or_404(session, job_id)
    cancelled = job_queries.cancel_job(session, job)
    session.commit()
    if not cancelled:
        raise ApiError(409, "not_cancellable", f"job {job_id} is already {job.status}")
    return _job_payload(session, job)


@bp.get("/<uuid:job_id>/results")
@require_role(SUBMIT)
@bp.input(ResultsQuery, location="query")
@bp.output(ResultPageOut)
@bp.doc(
    responses={
        200: {
            "description": "format=json: one page of results. format=jsonl or csv: every "
            "result, streamed as an attachment",
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/ResultPageOut"}},
                "application/x-ndjson": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        **_error_responses(400, 404),
    }
)
def job_results(job_id: uuid.UUID, query_data: dict[str, Any]) -> Any:
    """Per-image results of a job

    Items keep the seed's record shape (`image_path, predicted_class, predicted_emotion,
    confidence, all_probabilities`) plus `status`, `model_version` and, for failed images,
    `error`; JSON pages also give each item's `image_id` (for its thumbnail). Filter with
    `emotion` (aliases accepted) and `status`.
    """
    session = db_session()
    job = _job_or_404(session, job_id)
    emotion = _emotion_filter(query_data.get("emotion"))
    status = query_data.get("status")
    fmt = query_data["format"]
    if fmt != "json":
        sessions = services().sessions
        records = _iter_records(sessions, job.id, emotion=emotion, status=status)
        if fmt == "jsonl":
            body: Iterator[str] = (json.dumps(record) + "\n" for record in records)
            mimetype = "application/x-ndjson"
        else:
            body = _csv_lines(records)
            mimetype = "text/csv"
        return Response(
            body,
            mimetype=mimetype,
            headers={"Content-Disposition": f'attachment; filename="{job.id}-results.{fmt}"'},
        )

    page, limit = _page(query_data)
    rows = session.execute(
        job_queries.results_query(job.id, emotion=emotion, status=status)
        .offset((page - 1) * limit)
        .limit(limit)
    ).all()
    return {
        "items": [{**result_dict(image, result), "image_id": image.id} for image, result in rows],
        "page": page,
        "limit": limit,
        "total": job_queries.count_results(session, job.id, emotion=emotion, status=status),
    }


@bp.get("/<uuid:job_id>/summary")
@require_role(SUBMIT)
@bp.output(SummaryOut)
@bp.doc(responses=_error_responses(404))
def job_summary(job_id: uuid.UUID) -> dict[str, Any]:
    """Counts and mean confidence per predicted emotion"""
    session = db_session()
    job = _job_or_404(session, job_id)
    return {
        "job_id": str(job.id),
        "status": str(job.status),
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "emotions": job_queries.emotion_summary(session, job.id),
    }


# -- helpers ---------------------------------------------------------------------------------


def _job_or_404(session: Session, job_id: uuid.UUID) -> Job:
    """The job if this principal may see it; another token's job is "not found" too."""
    job = job_queries.get_job(session, job_id, owner=current_principal().owner_filter)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return job


def _job_payload(
    session: Session, job: Job, *, model_versions: list[int] | None = None
) -> dict[str, Any]:
    if model_versions is None:
        model_versions = job_queries.model_versions_used(session, job.id)
    return job_dict(job, model_versions)


def _location(job_id: uuid.UUID) -> dict[str, str]:
    return {"Location": url_for("jobs.get_job", job_id=job_id)}


def _page(query: dict[str, Any]) -> tuple[int, int]:
    """Clamp rather than refuse: a client asking for 10^6 rows gets the largest page."""
    limit = min(max(int(query.get("limit", 20)), 1), services().settings.max_page_size)
    page = min(max(int(query.get("page", 1)), 1), MAX_PAGE)
    return page, limit


def _emotion_filter(value: str | None) -> str | None:
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


def _iter_records(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    *,
    emotion: str | None,
    status: str | None,
) -> Iterator[dict[str, Any]]:
    """Every result in position order, read in keyset pages with short-lived sessions.

    The export outlives the request's session (the body streams after the view returns) and
    may be millions of rows; keyset paging keeps memory flat and no transaction open long.
    """
    last = -1
    while True:
        with sessions() as session:
            rows = session.execute(
                job_queries.results_query(job_id, emotion=emotion, status=status)
                .where(Image.position > last)
                .limit(EXPORT_BATCH)
            ).all()
            records = [result_dict(image, result) for image, result in rows]
        yield from records
        if len(rows) < EXPORT_BATCH:
            return
        last = rows[-1][0].position


def _csv_lines(records: Iterator[dict[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for count, record in enumerate(records, start=1):
        writer.writerow(csv_row(record))
        if count % 500 == 0:
            yield buffer.getvalue()
            buffer.seek(0)
            buffer.truncate()
    yield buffer.getvalue()
