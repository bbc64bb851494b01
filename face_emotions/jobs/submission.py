"""Submitting a batch job, without HTTP: store its images, commit it, send its chunks.

The order is what makes failures safe. The images are validated and stored first, then the job
and all its image rows are committed in one transaction, and only then are chunk tasks sent. A
failure before the commit leaves no job and (after :func:`remove_uploads`) no files; a broker
outage after it leaves a queued job that the recovery sweeper dispatches later, so the caller
still gets a job id and nothing is lost.

The API reads the request (file parts as ``(filename, stream)`` pairs, options already
validated) and hands plain values to :func:`submit_job`, so tests and other front ends submit
the same way without a web framework. Refusals are :class:`~face_emotions.jobs.intake.IntakeError`,
or whatever the caller's ``check_capacity`` raises.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from typing import IO

from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from face_emotions.data.storage import Storage
from face_emotions.jobs import job_queries
from face_emotions.jobs.broker import ChunkSender
from face_emotions.jobs.folder_intake import resolve_folder
from face_emotions.jobs.intake import IntakeError
from face_emotions.jobs.intake import secure_name
from face_emotions.jobs.intake import store_uploads
from face_emotions.jobs.job_queries import NewImage
from face_emotions.jobs.schema import Job
from face_emotions.jobs.zip_intake import extract_zip
from face_emotions.settings import Settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: Images are already compressed, so an honest archive inflates little; this bounds what a
#: zip of ``max_upload_mb`` may expand to on disk.
ZIP_EXPANSION_LIMIT = 4

#: Called with the number of images a job will add once that number is known; raises to refuse
#: the job (the API's back-pressure check). It runs before anything is committed, so a refusal
#: also removes what was already stored.
CapacityCheck = Callable[[int], None]


@dataclass(frozen=True)
class JobOptions:
    """Per-job settings the client chose (the caller fills in the defaults)."""

    batch_size: int
    model_version: int | None = None
    #: all | largest | none (the caller fills in the deployment's default).
    faces: str = "all"


@dataclass(frozen=True)
class UploadSource:
    """Uploaded files: images, or exactly one ``.zip`` of images."""

    files: Sequence[tuple[str, IO[bytes]]]
    options: JobOptions


@dataclass(frozen=True)
class FolderSource:
    """A folder under the server's data root (local or object store)."""

    folder: str
    recursive: bool
    options: JobOptions


JobSource = UploadSource | FolderSource


@dataclass(frozen=True)
class Submission:
    """What a job will be made of, once its images are stored or found."""

    source_type: str
    source: str
    images: list[NewImage]
    batch_size: int
    model_version: int | None
    faces: str
    skipped: int | None = None
    skipped_files: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class SubmittedJob:
    """The outcome of :func:`submit_job`.

    ``replayed``: another request with the same idempotency key created ``job`` first, and
    nothing new was stored or queued. ``dispatched`` is False when the broker refused a chunk;
    the committed job then waits, queued, for the recovery sweeper.
    """

    job: Job
    replayed: bool = False
    skipped: int | None = None
    skipped_files: list[str] = field(default_factory=list)
    dispatched: bool = True


def find_replay(session: Session, owner: str, idempotency_key: str | None) -> Job | None:
    """The job this owner already created with this key, so a retry gets it back for free."""
    if idempotency_key is None:
        return None
    return job_queries.find_by_idempotency_key(session, owner, idempotency_key)


def submit_job(
    session: Session,
    settings: Settings,
    source: JobSource,
    *,
    owner: str,
    idempotency_key: str | None,
    broker: ChunkSender,
    check_capacity: CapacityCheck,
) -> SubmittedJob:
    """Store the images, commit the job with its images in one transaction, send its chunks.

    Anything raised before the commit (a refusal, a crash) rolls back and removes the stored
    images before it propagates; a lost race on ``idempotency_key`` returns the winner's job.
    """
    job_id = uuid.uuid4()
    storage = Storage.from_url(
        settings.resolved_storage_url, s3_endpoint_url=settings.s3_endpoint_url
    )
    prefix = f"jobs/{job_id}"
    try:
        submission = build_submission(source, settings, storage, prefix, check_capacity)
        job = job_queries.create_job(
            session,
            job_id=job_id,
            source_type=submission.source_type,
            source=submission.source,
            images=submission.images,
            batch_size=submission.batch_size,
            chunk_size=submission.batch_size * settings.chunk_batches,
            owner=owner,
            idempotency_key=idempotency_key,
            model_version=submission.model_version,
            face_policy=submission.faces,
        )
        session.commit()
    except IntegrityError:
        # Two requests with the same key raced past the lookup; the other one won.
        session.rollback()
        remove_uploads(storage, prefix)
        existing = find_replay(session, owner, idempotency_key)
        if existing is None:
            raise
        return SubmittedJob(existing, replayed=True)
    except BaseException:
        session.rollback()
        remove_uploads(storage, prefix)
        raise
    dispatched = dispatch_chunks(session, job, broker)
    return SubmittedJob(
        job,
        skipped=submission.skipped,
        skipped_files=submission.skipped_files,
        dispatched=dispatched,
    )


def build_submission(
    source: JobSource,
    settings: Settings,
    storage: Storage,
    prefix: str,
    check_capacity: CapacityCheck,
) -> Submission:
    """Store uploaded images (or extract the zip) below ``prefix``, or list the folder.

    ``check_capacity`` runs as soon as the image count is known: before uploads are written,
    but only after a zip is extracted, since only then is its count known.
    """
    if isinstance(source, FolderSource):
        return _folder_submission(source, settings, check_capacity)
    return _upload_submission(source, settings, storage, prefix, check_capacity)


def _upload_submission(
    source: UploadSource,
    settings: Settings,
    storage: Storage,
    prefix: str,
    check_capacity: CapacityCheck,
) -> Submission:
    files = source.files
    options = source.options
    zips = [name for name, _stream in files if name.lower().endswith(".zip")]
    if zips:
        if len(files) > 1:
            raise IntakeError(
                "unsupported_file", "upload a .zip on its own, not together with other files"
            )
        name, stream = files[0]
        extraction = extract_zip(
            stream,
            storage,
            prefix,
            max_images=settings.max_images_per_job,
            max_total_bytes=settings.max_upload_mb * MIB * ZIP_EXPANSION_LIMIT,
        )
        # The count is known only now; submit_job removes what was extracted if this refuses.
        check_capacity(len(extraction.images))
        return Submission(
            source_type="zip",
            source=secure_name(name or "upload.zip"),
            images=extraction.images,
            batch_size=options.batch_size,
            model_version=options.model_version,
            faces=options.faces,
            skipped=extraction.skipped,
            skipped_files=extraction.skipped_examples,
        )
    if len(files) <= settings.max_images_per_job:  # else store_uploads says too_many_images
        check_capacity(len(files))
    images = store_uploads(files, storage, prefix, max_images=settings.max_images_per_job)
    return Submission(
        source_type="upload",
        source=f"{len(images)} file{'s' if len(images) != 1 else ''}",
        images=images,
        batch_size=options.batch_size,
        model_version=options.model_version,
        faces=options.faces,
    )


def _folder_submission(
    source: FolderSource, settings: Settings, check_capacity: CapacityCheck
) -> Submission:
    images = resolve_folder(
        settings.data_root,
        source.folder,
        recursive=source.recursive,
        max_images=settings.max_images_per_job,
        s3_endpoint_url=settings.s3_endpoint_url,
    )
    check_capacity(len(images))
    return Submission(
        source_type="folder",
        source=source.folder,
        images=images,
        batch_size=source.options.batch_size,
        model_version=source.options.model_version,
        faces=source.options.faces,
    )


def remove_uploads(storage: Storage, prefix: str) -> None:
    """Delete a refused job's uploads; a failed cleanup is logged, never raised over the
    error that made it necessary (a leftover prefix holds no job and can be swept)."""
    try:
        storage.delete_prefix(prefix)
    except Exception as exc:
        log.warning("could not remove %s/%s: %s", storage.url, prefix, exc)


def dispatch_chunks(session: Session, job: Job, broker: ChunkSender) -> bool:
    """Send one task per chunk; False when the broker refused (the job stays queued).

    Never raises for a broker failure: the job is committed, and the recovery sweeper sends
    what is missing once the broker is back.
    """
    chunks = job_queries.chunk_image_ids(session, job.id)
    session.commit()  # end the read transaction before talking to the broker
    sent = 0
    try:
        for chunk in sorted(chunks):
            broker.send_chunk(str(job.id), chunks[chunk])
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
