"""Jobs as the API sees them: create one with its images, find, list, cancel, read results.

Reads and the job's own writes only; what workers write while classifying is in
:mod:`face_emotions.jobs.result_writes`.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import cast

from sqlalchemy import ColumnElement
from sqlalchemy import CursorResult
from sqlalchemy import String
from sqlalchemy import Table
from sqlalchemy import cast as sa_cast
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.orm import Session

from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Job
from face_emotions.jobs.schema import JobStatus
from face_emotions.jobs.schema import Result
from face_emotions.jobs.schema import utcnow
from face_emotions.labels import EMOTIONS


@dataclass(frozen=True)
class NewImage:
    path: str  # shown to the user
    location: str  # read by the worker


def create_job(
    session: Session,
    *,
    source_type: str,
    source: str,
    images: Sequence[NewImage],
    batch_size: int,
    chunk_size: int,
    owner: str = "",
    idempotency_key: str | None = None,
    model_version: int | None = None,
    job_id: uuid.UUID | None = None,
    face_policy: str = "all",
) -> Job:
    """Insert the job and all its images (caller commits: one transaction for both)."""
    if not images:
        raise ValueError("a job needs at least one image")
    chunk_size = max(chunk_size, 1)
    job = Job(
        id=job_id or uuid.uuid4(),
        status=JobStatus.QUEUED,
        source_type=source_type,
        source=source,
        owner=owner,
        idempotency_key=idempotency_key,
        batch_size=batch_size,
        model_version=model_version,
        face_policy=face_policy,
        total=len(images),
        done=0,
        failed=0,
        chunks=(len(images) + chunk_size - 1) // chunk_size,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    # The declarative ``__table__`` is typed as a FromClause; it is the model's Table.
    session.execute(
        cast(Table, Image.__table__).insert(),
        [
            {
                "job_id": job.id,
                "position": i,
                "chunk": i // chunk_size,
                "path": image.path,
                "location": image.location,
                "attempts": 0,
            }
            for i, image in enumerate(images)
        ],
    )
    return job


def chunk_image_ids(
    session: Session, job_id: uuid.UUID, *, only_pending: bool = False
) -> dict[int, list[int]]:
    """Image ids per chunk, in position order (pending = without a result)."""
    query = select(Image.chunk, Image.id).where(Image.job_id == job_id).order_by(Image.position)
    if only_pending:
        query = query.outerjoin(Result, Result.image_id == Image.id).where(
            Result.image_id.is_(None)
        )
    chunks: dict[int, list[int]] = {}
    for chunk, image_id in session.execute(query):
        chunks.setdefault(chunk, []).append(image_id)
    return chunks


def find_by_idempotency_key(session: Session, owner: str, key: str) -> Job | None:
    return session.scalar(select(Job).where(Job.owner == owner, Job.idempotency_key == key))


def get_job(session: Session, job_id: uuid.UUID, *, owner: str | None = None) -> Job | None:
    """``owner=None`` means any owner (admins); otherwise other owners' jobs do not exist."""
    job = session.get(Job, job_id)
    if job is None or (owner is not None and job.owner != owner):
        return None
    return job


def list_jobs(
    session: Session,
    *,
    owner: str | None,
    offset: int,
    limit: int,
    id_prefix: str | None = None,
) -> tuple[list[Job], int]:
    """A page of jobs, newest first; ``id_prefix`` (hex digits, hyphens ignored) keeps the jobs
    whose id starts with it, which is how a short id from the console finds its job."""
    query = select(Job)
    count = select(func.count()).select_from(Job)
    if owner is not None:
        query = query.where(Job.owner == owner)
        count = count.where(Job.owner == owner)
    if id_prefix:
        # PostgreSQL writes a uuid with hyphens, SQLite stores 32 hex digits: compare without.
        digits = func.replace(func.lower(sa_cast(Job.id, String)), "-", "")
        matches = digits.like(id_prefix.replace("-", "").lower() + "%")
        query = query.where(matches)
        count = count.where(matches)
    jobs = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit)
    ).all()
    return list(jobs), int(session.scalar(count) or 0)


def cancel_job(session: Session, job: Job) -> bool:
    """Cancel a job that has not finished; chunks not yet started will skip it."""
    changed = cast(
        CursorResult[Any],
        session.execute(
            update(Job)
            .where(Job.id == job.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
            .values(status=JobStatus.CANCELLED, finished_at=utcnow())
        ),
    ).rowcount
    session.refresh(job)
    return bool(changed)


def model_versions_used(session: Session, job_id: uuid.UUID) -> list[int]:
    rows = session.scalars(
        select(Result.model_version)
        .where(Result.job_id == job_id, Result.model_version.is_not(None))
        .distinct()
    )
    return sorted(int(v) for v in rows if v is not None)  # the query already drops NULLs


def _result_filters(
    emotion: str | None, status: str | None, no_face: bool | None
) -> list[ColumnElement[bool]]:
    conditions: list[ColumnElement[bool]] = []
    if emotion is not None:
        conditions.append(Result.predicted_emotion == emotion)
    if status is not None:
        conditions.append(Result.status == status)
    if no_face is True:
        conditions.append(Result.faces_found == 0)
    elif no_face is False:
        conditions.append(Result.faces_found > 0)
    return conditions


def results_query(
    job_id: uuid.UUID,
    *,
    emotion: str | None = None,
    status: str | None = None,
    no_face: bool | None = None,
):
    """(Image, Result) rows of a job in position order; images without a result are left out.

    ``no_face`` True: only images where the detector found no face (classified whole); False:
    only images with at least one face.
    """
    return (
        select(Image, Result)
        .join(Result, Result.image_id == Image.id)
        .where(Image.job_id == job_id, *_result_filters(emotion, status, no_face))
        .order_by(Image.position)
    )


def count_results(
    session: Session,
    job_id: uuid.UUID,
    *,
    emotion: str | None = None,
    status: str | None = None,
    no_face: bool | None = None,
) -> int:
    query = (
        select(func.count())
        .select_from(Result)
        .where(Result.job_id == job_id, *_result_filters(emotion, status, no_face))
    )
    return int(session.scalar(query) or 0)


def face_summary(session: Session, job_id: uuid.UUID) -> dict[str, int]:
    """Faces over a job's classified images: how many, and how many images had none or several.

    ``not_searched`` counts classified images detection did not run on (policy ``none``).
    """
    row = session.execute(
        select(
            func.coalesce(func.sum(Result.faces_found), 0),
            func.count().filter(Result.faces_found == 0),
            func.count().filter(Result.faces_found > 1),
            func.count().filter(Result.faces_found.is_(None)),
        ).where(Result.job_id == job_id, Result.status == "succeeded")
    ).one()
    faces, without, several, not_searched = (int(value or 0) for value in row)
    return {
        "faces": faces,
        "images_without_face": without,
        "images_with_several_faces": several,
        "not_searched": not_searched,
    }


def emotion_summary(session: Session, job_id: uuid.UUID) -> dict[str, dict[str, float | int]]:
    rows = session.execute(
        select(Result.predicted_emotion, func.count(), func.avg(Result.confidence))
        .where(Result.job_id == job_id, Result.status == "succeeded")
        .group_by(Result.predicted_emotion)
    ).all()
    found = {emotion: (int(n), float(mean or 0.0)) for emotion, n, mean in rows}
    return {
        name: {
            "count": found.get(name, (0, 0.0))[0],
            "mean_confidence": found.get(name, (0, 0.0))[1],
        }
        for name in EMOTIONS
    }
