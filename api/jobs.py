"""``/api/v1/jobs``: submit a batch, follow it, cancel it, read and export its results.

Every route needs a token with the ``submit`` role (admins too). A job belongs to the token that
submitted it: submit tokens see, list and cancel only their own jobs (another token's job is a
404, so its existence is not revealed), admins see all of them.

Submission order matters for failure handling: the request is validated and its files stored
first, then the job and all image rows are committed in one transaction, and only then are
chunk tasks sent (:mod:`face_emotions.jobs.submission`). A crash before the commit leaves no
job and (after cleanup) no files; a broker outage after it leaves a queued job that the
recovery sweeper dispatches later, so the client still gets its job id and nothing is lost.

The views only translate HTTP: request parsing is in :mod:`api.job_requests`, the export in
:mod:`api.exports`, hand-written OpenAPI in :mod:`api.openapi_docs`.
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from apiflask import APIBlueprint
from flask import current_app
from flask import url_for
from sqlalchemy import Engine
from sqlalchemy import select
from sqlalchemy.orm import Session

from api.auth import SUBMIT
from api.auth import current_principal
from api.auth import require_role
from api.errors import ApiError
from api.exports import export_response
from api.extensions import db_session
from api.extensions import services
from api.job_requests import emotion_filter
from api.job_requests import idempotency_key
from api.job_requests import intake_error
from api.job_requests import read_job_source
from api.limits import check_backlog
from api.limits import submission_limits
from api.openapi_docs import JOB_NOT_FOUND
from api.openapi_docs import RESULTS_RESPONSES
from api.openapi_docs import SUBMISSION_RESPONSES
from api.openapi_docs import error_responses
from api.schemas.common import clamp_page
from api.schemas.jobs import JobCreatedOut
from api.schemas.jobs import JobListQuery
from api.schemas.jobs import JobOut
from api.schemas.jobs import JobPageOut
from api.schemas.jobs import JobQuery
from api.schemas.jobs import ResultPageOut
from api.schemas.jobs import ResultsQuery
from api.schemas.jobs import SummaryOut
from api.serialize import job_dict
from api.serialize import model_versions_by_job
from api.serialize import result_dict
from face_emotions.jobs import job_queries
from face_emotions.jobs import submission
from face_emotions.jobs.intake import IntakeError
from face_emotions.jobs.schema import TERMINAL_STATUSES
from face_emotions.jobs.schema import Job
from face_emotions.jobs.schema import JobStatus
from face_emotions.ops.log_format import job_context

log = logging.getLogger(__name__)
#: How often a waiting status request reads the job's status (GET /jobs/<id>?wait=...).
WAIT_CHECK_SECONDS = 0.05

bp = APIBlueprint("jobs", __name__, url_prefix="/api/v1/jobs", tag="jobs")

BROKER_WARNING = (
    "queued in the database; the broker is unreachable, the job will be dispatched when it recovers"
)


@bp.post("")
@require_role(SUBMIT)
@bp.output(JobCreatedOut, status_code=202, description="Job accepted and queued")
@bp.doc(responses=SUBMISSION_RESPONSES)
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
    key = idempotency_key()
    existing = submission.find_replay(session, owner, key)
    if existing is not None:
        return _job_payload(session, existing), 200, _location(existing.id)
    submission_limits(current_app).check_rate()
    # Refuse before reading the body when even a one-image job would not fit.
    check_backlog(session, settings, 1)
    session.commit()  # end the read transaction; the body may take a while to arrive

    source = read_job_source(settings)
    try:
        submitted = submission.submit_job(
            session,
            settings,
            source,
            owner=owner,
            idempotency_key=key,
            broker=state.broker,
            check_capacity=lambda count: check_backlog(session, settings, count),
        )
    except IntakeError as exc:
        raise intake_error(exc) from exc
    job = submitted.job
    if submitted.replayed:
        return _job_payload(session, job), 200, _location(job.id)

    payload = _job_payload(session, job, model_versions=[])
    if submitted.skipped is not None:
        payload["skipped"] = submitted.skipped
        payload["skipped_files"] = submitted.skipped_files
    if not submitted.dispatched:
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


@bp.get("")
@require_role(SUBMIT)
@bp.input(JobListQuery, location="query")
@bp.output(JobPageOut)
def list_jobs(query_data: dict[str, Any]) -> dict[str, Any]:
    """List jobs, newest first

    Submit tokens see their own jobs, admins every job. `limit` is clamped to
    1..EMOTIONS_MAX_PAGE_SIZE and `page` to 1..2^31-1 (a page past the end is empty).
    `id_prefix` keeps the jobs whose id starts with it (the console's short ids).
    """
    page, limit = clamp_page(query_data, services().settings.max_page_size)
    session = db_session()
    owner = current_principal().owner_filter
    jobs, total = job_queries.list_jobs(
        session,
        owner=owner,
        offset=(page - 1) * limit,
        limit=limit,
        id_prefix=query_data.get("id_prefix"),
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
@bp.input(JobQuery, location="query")
@bp.output(JobOut)
@bp.doc(responses=error_responses(JOB_NOT_FOUND))
def get_job(job_id: uuid.UUID, query_data: dict[str, Any]) -> dict[str, Any]:
    """Status, counts, progress, model versions used and timings of a job

    With `wait`, the answer waits for the job to end, up to that many seconds.
    """
    session = db_session()
    job = _job_or_404(session, job_id)
    if query_data["wait"] > 0 and JobStatus(job.status) not in TERMINAL_STATUSES:
        job = _wait_for_end(session, job, query_data["wait"])
    return _job_payload(session, job)


@bp.delete("/<uuid:job_id>")
@require_role(SUBMIT)
@bp.output(JobOut, description="The cancelled job")
@bp.doc(responses=error_responses({**JOB_NOT_FOUND, 409: "Conflict"}))
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
@bp.doc(responses=RESULTS_RESPONSES)
def job_results(job_id: uuid.UUID, query_data: dict[str, Any]) -> Any:
    """Per-image results of a job

    Items keep the seed's record shape (`image_path, predicted_class, predicted_emotion,
    confidence, all_probabilities`) plus `status`, `model_version` and, for failed images,
    `error`; JSON pages also give each item's `image_id` (for its thumbnail). Filter with
    `emotion` (aliases accepted), `status` and `no_face`. Each item's `faces` lists every
    classified face (box, detector score, landmarks, prediction), largest first; the
    image-level fields describe the first. CSV has one row per face.
    """
    session = db_session()
    job = _job_or_404(session, job_id)
    filters: dict[str, Any] = {
        "emotion": emotion_filter(query_data.get("emotion")),
        "status": query_data.get("status"),
        "no_face": query_data.get("no_face"),
    }
    fmt = query_data["format"]
    if fmt != "json":
        return export_response(services().sessions, job.id, fmt, **filters)

    page, limit = clamp_page(query_data, services().settings.max_page_size)
    rows = session.execute(
        job_queries.results_query(job.id, **filters).offset((page - 1) * limit).limit(limit)
    ).all()
    return {
        "items": [{**result_dict(image, result), "image_id": image.id} for image, result in rows],
        "page": page,
        "limit": limit,
        "total": job_queries.count_results(session, job.id, **filters),
    }


@bp.get("/<uuid:job_id>/summary")
@require_role(SUBMIT)
@bp.output(SummaryOut)
@bp.doc(responses=error_responses(JOB_NOT_FOUND))
def job_summary(job_id: uuid.UUID) -> dict[str, Any]:
    """Counts and mean confidence per predicted emotion, and faces found

    Emotions count images (each by its largest face); `faces` counts the faces found and the
    images where none was (classified whole) or several were.
    """
    session = db_session()
    job = _job_or_404(session, job_id)
    return {
        "job_id": str(job.id),
        "status": str(job.status),
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "emotions": job_queries.emotion_summary(session, job.id),
        "faces": job_queries.face_summary(session, job.id),
    }


# -- helpers ---------------------------------------------------------------------------------


def _job_or_404(session: Session, job_id: uuid.UUID) -> Job:
    """The job if this principal may see it; another token's job is "not found" too."""
    job = job_queries.get_job(session, job_id, owner=current_principal().owner_filter)
    if job is None:
        raise ApiError(404, "not_found", f"no job {job_id}")
    return job


def _wait_for_end(session: Session, job: Job, seconds: float) -> Job:
    """The job once it ended, or as it is after ``seconds``.

    Each check is one read of the status by primary key on a pooled connection of its own,
    outside the ORM session (about half the CPU of a session round trip): its own
    transaction, because SQLite's WAL shows a reader the database as it was when its
    transaction began, and the connection goes back to the pool while this request sleeps, so
    waiting clients do not hold the pool (a gevent worker sleeps cooperatively: a waiting
    client costs a greenlet, not a thread).
    """
    deadline = time.monotonic() + seconds
    job_id = job.id
    status_of = select(Job.status).where(Job.id == job_id)
    bind = session.get_bind()
    engine = bind if isinstance(bind, Engine) else bind.engine
    session.rollback()  # the request's own read transaction: its connection goes back now
    while time.monotonic() < deadline:
        with engine.connect() as connection:
            status = connection.execute(status_of).scalar()
        if status is None:  # deleted while we waited
            raise ApiError(404, "not_found", f"no job {job_id}")
        if JobStatus(status) in TERMINAL_STATUSES:
            break
        time.sleep(min(WAIT_CHECK_SECONDS, max(0.0, deadline - time.monotonic())))
    session.refresh(job)
    return job


def _job_payload(
    session: Session, job: Job, *, model_versions: list[int] | None = None
) -> dict[str, Any]:
    """``model_versions`` is known to be empty for a job just created: no query then."""
    if model_versions is None:
        model_versions = job_queries.model_versions_used(session, job.id)
    return job_dict(job, model_versions)


def _location(job_id: uuid.UUID) -> dict[str, str]:
    return {"Location": url_for("jobs.get_job", job_id=job_id)}
