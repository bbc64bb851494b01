"""The queries of the recovery sweeper: find stalled jobs, claim one, list its pending chunks.

A claim is a conditional ``UPDATE`` on the job's progress time, so two sweepers (one per
worker) never handle the same job in the same period.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from typing import cast

from sqlalchemy import CursorResult
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy import update
from sqlalchemy.orm import Session

from face_emotions.jobs.schema import ACTIVE_STATUSES
from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Job
from face_emotions.jobs.schema import Result

#: Jobs that may still have work to do; everything else is left alone by recovery.


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
    result = cast(
        CursorResult[Any],
        session.execute(
            update(Job)
            .where(Job.id == job_id, Job.status.in_(ACTIVE_STATUSES), _last_progress() < cutoff)
            .values(progressed_at=now)
            .execution_options(synchronize_session=False)
        ),
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
