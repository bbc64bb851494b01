"""Recovery sweeper: re-enqueue the chunks of jobs that stopped making progress, and send the
training runs the broker never had.

Redelivery by the broker covers a worker process that dies (``acks_late`` +
``reject_on_worker_lost``), but not a task the broker itself lost: a Redis restart without
persistence, a whole worker killed while its reserved task waits for the visibility timeout,
or a job whose tasks were never sent because the API could not reach the broker. The database
knows what is missing (images without a result), so the sweeper looks there:

- a job still ``queued`` or ``running`` that made no progress for ``stall_seconds`` is
  *stalled*; each chunk with images still without a result is sent again through ``enqueue``;
- a chunk whose pending images were already delivered ``max_attempts`` times (workers count
  each delivery, see :mod:`face_emotions.serving.chunk_classifier`) is not sent again: its images
  are failed with the reason, so a chunk that keeps killing workers still lets the job finish;
- a training run accepted while the broker was down (queued, never sent) is sent
  (:func:`dispatch_stranded_runs`), as chunks are: the trainer starts it once however often it
  was sent (see :func:`face_emotions.jobs.training_runs.mark_running`).

Re-sending is always safe: a chunk only classifies images without a result and a result's
primary key is its image, so a chunk that was only slow, not lost, costs a skipped task. Each
stalled job is claimed in the database before anything is sent (a conditional UPDATE that
moves ``progressed_at``), so two sweepers never both handle it and it is not swept again until
another stall period has passed without progress.

This module is core (no Celery): callers pass ``enqueue(job_id, image_ids)``.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from datetime import datetime
from datetime import timedelta

from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs import recovery_queries
from face_emotions.jobs import result_writes
from face_emotions.jobs import training_runs
from face_emotions.jobs.database import with_db_retry
from face_emotions.jobs.schema import utcnow

log = logging.getLogger(__name__)

#: ``enqueue(job_id, image_ids)``: send one chunk task; raise if the broker did not take it.
Enqueue = Callable[[str, list[int]], None]

#: What the ``worker`` column of a result says for images the sweeper gave up on.
SWEEPER_NAME = "recovery-sweeper"

#: Jobs handled per sweep, so that one sweep stays short after a long outage; the rest are
#: still stalled at the next sweep.
DEFAULT_JOB_LIMIT = 200
#: A queued, unsent training run younger than this is left to the API request that created
#: it: that request sends it right after its commit.
TRAINING_DISPATCH_MIN_AGE_SECONDS = 10.0


def gave_up_reason(deliveries: int) -> str:
    """The per-image error of a chunk that never produced a result (shown to users)."""
    return f"gave up after {deliveries} deliveries without a result"


@dataclass
class SweepReport:
    """What one sweep did; logged by the caller, asserted on by tests."""

    jobs: list[str] = field(default_factory=list)  # stalled jobs this sweep handled
    chunks_enqueued: int = 0
    images_enqueued: int = 0
    chunks_given_up: int = 0
    images_failed: int = 0
    skipped: int = 0  # stalled jobs another sweeper (or new progress) took first
    enqueue_error: str | None = None  # set when the broker refused; the sweep stopped there
    training_runs_sent: list[str] = field(default_factory=list)  # runs the broker never had
    orphan_uploads_removed: list[str] = field(default_factory=list)  # jobs/<id> without a job

    @property
    def idle(self) -> bool:
        return (
            not self.jobs
            and not self.skipped
            and self.enqueue_error is None
            and not self.training_runs_sent
            and not self.orphan_uploads_removed
        )

    def as_dict(self) -> dict:
        return {
            "jobs": list(self.jobs),
            "chunks_enqueued": self.chunks_enqueued,
            "images_enqueued": self.images_enqueued,
            "chunks_given_up": self.chunks_given_up,
            "images_failed": self.images_failed,
            "skipped": self.skipped,
            "enqueue_error": self.enqueue_error,
            "training_runs_sent": list(self.training_runs_sent),
            "orphan_uploads_removed": list(self.orphan_uploads_removed),
        }


def sweep(
    sessions: sessionmaker[Session],
    enqueue: Enqueue,
    *,
    stall_seconds: float,
    max_attempts: int,
    now: datetime | None = None,
    limit: int = DEFAULT_JOB_LIMIT,
) -> SweepReport:
    """Recover every job stalled for ``stall_seconds``; see the module docstring.

    ``now`` is for tests (an aware UTC datetime). ``stall_seconds`` is the caller's choice:
    the worker passes a longer period while tasks are waiting in the queue (see
    ``worker.recovery``). Database work is retried on connection loss and each step is
    idempotent. When ``enqueue`` raises (broker down), the sweep stops (the other jobs would
    fail the same way); if none of that job's chunks had been sent, its claim is released so
    the next sweep tries again instead of one stall period later.
    """
    now = now or utcnow()
    cutoff = now - timedelta(seconds=stall_seconds)
    report = SweepReport()

    def find() -> list[uuid.UUID]:
        with sessions() as session:
            return recovery_queries.stalled_job_ids(session, cutoff=cutoff, limit=limit)

    for job_id in with_db_retry(find):
        if not _recover_job(sessions, enqueue, job_id, cutoff, now, max_attempts, report):
            break
    return report


def _recover_job(
    sessions: sessionmaker[Session],
    enqueue: Enqueue,
    job_id: uuid.UUID,
    cutoff: datetime,
    now: datetime,
    max_attempts: int,
    report: SweepReport,
) -> bool:
    """Handle one stalled job; False when the broker refused and the sweep should stop."""

    def claim() -> tuple[bool, datetime | None, dict[int, recovery_queries.PendingChunk]]:
        with sessions() as session:
            previous = recovery_queries.last_progress(session, job_id)
            if not recovery_queries.claim_stalled_job(session, job_id, cutoff=cutoff, now=now):
                session.rollback()
                return False, None, {}
            chunks = recovery_queries.pending_chunks(session, job_id)
            session.commit()
            return True, previous, chunks

    claimed, previous, chunks = with_db_retry(claim)
    if not claimed:
        report.skipped += 1
        return True
    report.jobs.append(str(job_id))
    sent = 0
    for number in sorted(chunks):
        chunk = chunks[number]
        if chunk.attempts >= max_attempts:
            failed = fail_chunk(sessions, job_id, chunk.image_ids, gave_up_reason(chunk.attempts))
            report.chunks_given_up += 1
            report.images_failed += failed
            log.warning(
                "job %s chunk %d: %d images failed after %d deliveries without a result",
                job_id,
                number,
                failed,
                chunk.attempts,
            )
            continue
        try:
            enqueue(str(job_id), list(chunk.image_ids))
        except Exception as exc:
            report.enqueue_error = _describe(exc)
            log.warning("job %s: could not re-enqueue chunk %d: %s", job_id, number, exc)
            if sent == 0:
                _release(sessions, job_id, now, previous)
            return False
        sent += 1
        report.chunks_enqueued += 1
        report.images_enqueued += len(chunk.image_ids)
    if chunks:
        log.info(
            "job %s stalled since %s: re-enqueued %d chunks",
            job_id,
            previous.isoformat() if previous else "creation",
            sent,
        )
    else:  # pragma: no cover - counters and results are written in one transaction
        log.warning("job %s is unfinished but every image has a result", job_id)
    return True


def dispatch_stranded_runs(
    sessions: sessionmaker[Session],
    send: training_runs.SendRun,
    *,
    now: datetime | None = None,
    min_age_seconds: float = TRAINING_DISPATCH_MIN_AGE_SECONDS,
) -> tuple[list[str], str | None]:
    """Send the queued training runs that never reached the broker; the runs sent and, when
    the broker refused, why (the rest wait for the next sweep).

    Runs younger than ``min_age_seconds`` are left to the request that created them, which
    sends them itself right after its commit (and says in its answer when it could not).
    """
    now = now or utcnow()
    sent, error = training_runs.dispatch_pending(
        sessions, send, created_before=now - timedelta(seconds=min_age_seconds)
    )
    if sent:
        log.info(
            "sent %d training run(s) the broker never had: %s",
            len(sent),
            ", ".join(map(str, sent)),
        )
    if error is not None:
        log.warning("training runs still not sent, the broker refused: %s", error)
    return [str(run_id) for run_id in sent], None if error is None else _describe(error)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def fail_chunk(
    sessions: sessionmaker[Session],
    job_id: uuid.UUID,
    image_ids: Sequence[int],
    reason: str,
    *,
    worker: str = SWEEPER_NAME,
) -> int:
    """Give up on a chunk: its images without a result get a failed result with ``reason``.

    Counters and the job's final status move as for any result, so the job terminates; an
    image that got a prediction meanwhile keeps it. Returns how many images were failed.
    Workers call it too (a chunk out of deliveries, a task out of retries).
    """

    def write() -> int:
        with sessions() as session:
            failed = result_writes.fail_pending_images(
                session, job_id, image_ids, reason, worker=worker
            )
            session.commit()
            return failed

    # Safe to retry: an image that already got its failed result is skipped the second time.
    return with_db_retry(write)


def _release(
    sessions: sessionmaker[Session], job_id: uuid.UUID, now: datetime, previous: datetime | None
) -> None:
    def write() -> None:
        with sessions() as session:
            recovery_queries.release_claim(session, job_id, claimed_at=now, previous=previous)
            session.commit()

    try:
        with_db_retry(write)
    except Exception as exc:  # the job is then swept again one stall period later
        log.warning("job %s: could not release the sweeper's claim: %s", job_id, exc)
