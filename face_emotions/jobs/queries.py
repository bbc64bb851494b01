"""The queries the API and the workers share: create a job, record results, read progress.

Every write that a redelivered task could repeat is idempotent: results are inserted with
``ON CONFLICT DO NOTHING`` and only rows that were really inserted move the job's counters.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from face_emotions.jobs.schema import (
    TERMINAL_STATUSES,
    Image,
    Job,
    JobStatus,
    Result,
    WorkerState,
    utcnow,
)
from face_emotions.labels import EMOTIONS


@dataclass(frozen=True)
class NewImage:
    path: str  # shown to the user
    location: str  # read by the worker


@dataclass(frozen=True)
class ResultRow:
    image_id: int
    probabilities: Sequence[float] | None = None
    error: str | None = None


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
        total=len(images),
        done=0,
        failed=0,
        chunks=(len(images) + chunk_size - 1) // chunk_size,
        created_at=utcnow(),
    )
    session.add(job)
    session.flush()
    session.execute(
        Image.__table__.insert(),
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
    session: Session, *, owner: str | None, offset: int, limit: int
) -> tuple[list[Job], int]:
    query = select(Job)
    count = select(func.count()).select_from(Job)
    if owner is not None:
        query = query.where(Job.owner == owner)
        count = count.where(Job.owner == owner)
    jobs = session.scalars(
        query.order_by(Job.created_at.desc(), Job.id).offset(offset).limit(limit)
    ).all()
    return list(jobs), int(session.scalar(count) or 0)


def cancel_job(session: Session, job: Job) -> bool:
    """Cancel a job that has not finished; chunks not yet started will skip it."""
    changed = session.execute(
        update(Job)
        .where(Job.id == job.id, Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))
        .values(status=JobStatus.CANCELLED, finished_at=utcnow())
    ).rowcount
    session.refresh(job)
    return bool(changed)


def start_chunk(session: Session, job_id: uuid.UUID) -> Job | None:
    """Mark the job running; ``None`` tells the task to skip (cancelled, finished or gone).

    A delivery that starts is progress: the recovery sweeper leaves the job alone for another
    stall period, including while its chunks wait for a model (they retry on their own).
    """
    now = utcnow()
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.RUNNING, started_at=now, progressed_at=now)
    )
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.RUNNING)
        .values(progressed_at=now)
        .execution_options(synchronize_session=False)
    )
    job = session.get(Job, job_id, populate_existing=True)
    if job is None or JobStatus(job.status) in TERMINAL_STATUSES:
        return None
    return job


def pending_images(session: Session, job_id: uuid.UUID, image_ids: Iterable[int]) -> list[Image]:
    """Images of this chunk that still have no result, in position order."""
    ids = list(image_ids)
    if not ids:
        return []
    return list(
        session.scalars(
            select(Image)
            .outerjoin(Result, Result.image_id == Image.id)
            .where(Image.job_id == job_id, Image.id.in_(ids), Result.image_id.is_(None))
            .order_by(Image.position)
        )
    )


def record_results(
    session: Session,
    job_id: uuid.UUID,
    rows: Sequence[ResultRow],
    *,
    model_version: int | None,
    worker: str | None,
    forward_batch: int | None = None,
) -> tuple[int, int]:
    """Insert one micro-batch of results and move the counters by what was really new.

    Returns (newly succeeded, newly failed). The caller commits; together with the unique
    image id this is what makes a repeated task write nothing twice.
    """
    if not rows:
        return 0, 0
    now = utcnow()
    values: list[dict[str, Any]] = []
    for row in rows:
        value: dict[str, Any] = {
            "image_id": row.image_id,
            "job_id": job_id,
            "model_version": model_version,
            "worker": worker,
            "forward_batch": forward_batch,
            "created_at": now,
            "predicted_class": None,
            "predicted_emotion": None,
            "confidence": None,
            "probabilities": None,
            "error": None,
        }
        if row.error is not None or row.probabilities is None:
            value.update(status="failed", error=row.error or "no prediction")
        else:
            probs = [float(p) for p in row.probabilities]
            index = max(range(len(probs)), key=probs.__getitem__)
            value.update(
                status="succeeded",
                predicted_class=index,
                predicted_emotion=EMOTIONS[index],
                confidence=probs[index],
                probabilities={name: p for name, p in zip(EMOTIONS, probs, strict=True)},
            )
        values.append(value)
    insert = _insert_for(session)
    inserted = session.execute(
        insert(Result)
        .values(values)
        .on_conflict_do_nothing(index_elements=["image_id"])
        .returning(Result.image_id, Result.status)
    ).all()
    statuses = Counter(status for _, status in inserted)
    new_done, new_failed = statuses.get("succeeded", 0), statuses.get("failed", 0)
    if new_done or new_failed:
        _advance_job(session, job_id, new_done, new_failed, now)
    return new_done, new_failed


def _advance_job(
    session: Session, job_id: uuid.UUID, done: int, failed: int, now: datetime
) -> None:
    total, done_now, failed_now = session.execute(
        update(Job)
        .where(Job.id == job_id)
        .values(done=Job.done + done, failed=Job.failed + failed, progressed_at=now)
        .returning(Job.total, Job.done, Job.failed)
    ).one()
    if done_now + failed_now >= total:
        if done_now == 0:
            status = JobStatus.FAILED
        elif failed_now:
            status = JobStatus.COMPLETED_WITH_ERRORS
        else:
            status = JobStatus.SUCCEEDED
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.not_in(list(TERMINAL_STATUSES)))
            .values(
                status=status,
                finished_at=now,
                error="every image failed" if status is JobStatus.FAILED else None,
            )
        )


def _insert_for(session: Session):
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    elif dialect == "sqlite":
        from sqlalchemy.dialects.sqlite import insert
    else:  # pragma: no cover - only PostgreSQL and SQLite are supported
        raise RuntimeError(f"unsupported database dialect {dialect!r}")
    return insert


def model_versions_used(session: Session, job_id: uuid.UUID) -> list[int]:
    rows = session.scalars(
        select(Result.model_version)
        .where(Result.job_id == job_id, Result.model_version.is_not(None))
        .distinct()
    )
    return sorted(int(v) for v in rows)


def results_query(job_id: uuid.UUID, *, emotion: str | None = None, status: str | None = None):
    """(Image, Result) rows of a job in position order; images without a result are left out."""
    query = (
        select(Image, Result)
        .join(Result, Result.image_id == Image.id)
        .where(Image.job_id == job_id)
        .order_by(Image.position)
    )
    if emotion is not None:
        query = query.where(Result.predicted_emotion == emotion)
    if status is not None:
        query = query.where(Result.status == status)
    return query


def count_results(
    session: Session, job_id: uuid.UUID, *, emotion: str | None = None, status: str | None = None
) -> int:
    query = select(func.count()).select_from(Result).where(Result.job_id == job_id)
    if emotion is not None:
        query = query.where(Result.predicted_emotion == emotion)
    if status is not None:
        query = query.where(Result.status == status)
    return int(session.scalar(query) or 0)


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


def touch_worker(
    session: Session,
    name: str,
    *,
    model_version: int | None,
    device: str | None,
    backend: str | None,
    processed: int = 0,
) -> None:
    """Upsert the worker's heartbeat row (what it serves, how much it has done)."""
    insert = _insert_for(session)
    now = utcnow()
    stmt = insert(WorkerState).values(
        name=name,
        model_version=model_version,
        device=device,
        backend=backend,
        images_processed=processed,
        started_at=now,
        last_seen=now,
    )
    session.execute(
        stmt.on_conflict_do_update(
            index_elements=["name"],
            set_={
                "model_version": model_version,
                "device": device,
                "backend": backend,
                "images_processed": WorkerState.images_processed + processed,
                "last_seen": now,
            },
        )
    )


def live_workers(session: Session, *, since: datetime) -> list[WorkerState]:
    return list(
        session.scalars(
            select(WorkerState).where(WorkerState.last_seen >= since).order_by(WorkerState.name)
        )
    )


# --- Recovery: delivery counting and the sweeper's queries -----------------------------------

#: Jobs that may still have work to do; everything else is left alone by recovery.
ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


def _last_progress():
    """When a job last moved: its last progress, else its creation (never-dispatched jobs)."""
    return func.coalesce(Job.progressed_at, Job.created_at)


def stalled_job_ids(session: Session, *, cutoff: datetime, limit: int) -> list[uuid.UUID]:
    """Unfinished jobs without progress since ``cutoff``, the longest-stalled first."""
    return list(
        session.scalars(
            select(Job.id)
            .where(Job.status.in_(ACTIVE_STATUSES), _last_progress() < cutoff)
            .order_by(_last_progress(), Job.id)
            .limit(limit)
        )
    )


def claim_stalled_job(
    session: Session, job_id: uuid.UUID, *, cutoff: datetime, now: datetime
) -> bool:
    """Mark a stalled job as handled now; False when it progressed or another sweeper won.

    The condition is re-checked in the UPDATE itself, so of two sweepers racing for the same
    job exactly one sees a row change; moving ``progressed_at`` also keeps the job out of the
    next sweeps until another stall period has passed without progress. Caller commits.
    """
    result = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES), _last_progress() < cutoff)
        .values(progressed_at=now)
        .execution_options(synchronize_session=False)
    )
    return result.rowcount == 1


def release_claim(
    session: Session, job_id: uuid.UUID, *, claimed_at: datetime, previous: datetime | None
) -> None:
    """Undo :func:`claim_stalled_job` when nothing could be re-enqueued (broker down), so the
    next sweep tries again instead of waiting a whole stall period; real progress made since
    the claim is left alone. Caller commits."""
    session.execute(
        update(Job)
        .where(Job.id == job_id, Job.progressed_at == claimed_at)
        .values(progressed_at=previous)
        .execution_options(synchronize_session=False)
    )


def last_progress(session: Session, job_id: uuid.UUID) -> datetime | None:
    """The job's ``progressed_at`` as stored (``None`` before its first chunk started)."""
    return session.scalar(select(Job.progressed_at).where(Job.id == job_id))


@dataclass(frozen=True)
class PendingChunk:
    """Images of one chunk still without a result, and the most deliveries any of them had."""

    image_ids: list[int]
    attempts: int


def pending_chunks(session: Session, job_id: uuid.UUID) -> dict[int, PendingChunk]:
    """Every chunk of the job that still has images without a result, by chunk number."""
    rows = session.execute(
        select(Image.chunk, Image.id, Image.attempts)
        .outerjoin(Result, Result.image_id == Image.id)
        .where(Image.job_id == job_id, Result.image_id.is_(None))
        .order_by(Image.position)
    )
    ids: dict[int, list[int]] = {}
    attempts: dict[int, int] = {}
    for chunk, image_id, tries in rows:
        ids.setdefault(chunk, []).append(image_id)
        attempts[chunk] = max(attempts.get(chunk, 0), int(tries or 0))
    return {chunk: PendingChunk(ids[chunk], attempts[chunk]) for chunk in ids}


def pending_attempts(session: Session, job_id: uuid.UUID, image_ids: Iterable[int]) -> int | None:
    """Most deliveries among these images that still have no result; ``None`` when every one
    of them has a result (nothing is left to retry or to give up on)."""
    ids = list(image_ids)
    if not ids:
        return None
    value = session.scalar(
        select(func.max(Image.attempts))
        .outerjoin(Result, Result.image_id == Image.id)
        .where(Image.job_id == job_id, Image.id.in_(ids), Result.image_id.is_(None))
    )
    return None if value is None else int(value)


def count_delivery(session: Session, job_id: uuid.UUID, image_ids: Iterable[int]) -> None:
    """One more delivery of these (pending) images, which is progress of their job; caller
    commits.

    Counted per image rather than per message, so it survives redeliveries, Celery retries and
    sweeper re-enqueues alike, and a partly finished chunk only counts what it still owes. A
    delivery that starts working moves ``progressed_at`` so the sweeper gives it a whole stall
    period before sending its chunk again.
    """
    ids = list(image_ids)
    if ids:
        session.execute(
            update(Image)
            .where(Image.id.in_(ids))
            .values(attempts=Image.attempts + 1)
            .execution_options(synchronize_session=False)
        )
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES))
            .values(progressed_at=utcnow())
            .execution_options(synchronize_session=False)
        )


def fail_pending_images(
    session: Session,
    job_id: uuid.UUID,
    image_ids: Iterable[int],
    reason: str,
    *,
    worker: str | None,
) -> int:
    """Give up on these images: each one still without a result gets a failed result with
    ``reason``. Goes through :func:`record_results`, so counters and the job's final status
    move exactly as for any other result, and an image that got a prediction meanwhile keeps
    it. Returns how many images were failed; caller commits."""
    pending = [image.id for image in pending_images(session, job_id, image_ids)]
    rows = [ResultRow(image_id, error=reason) for image_id in pending]
    _, failed = record_results(session, job_id, rows, model_version=None, worker=worker)
    return failed
