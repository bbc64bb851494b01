"""Celery tasks: decode arguments, call the core chunk classifier, map failures to retries.

Three kinds of failure, three answers:

- no model to serve (:class:`ModelUnavailable`): retry every ``MODEL_RETRY_SECONDS`` for up to
  an hour; the chunk is not to blame, so the delivery is not counted against its images;
- any other exception: retry with exponential backoff and jitter while the chunk's images have
  had fewer than ``EMOTIONS_MAX_CHUNK_ATTEMPTS`` deliveries, then fail them with a short reason
  (exception type and first line, credentials masked) so that the job terminates;
- the pool process dies (SIGKILL, OOM): ``reject_on_worker_lost`` puts the message back at
  once; the delivery count in the database bounds how often that can happen to one chunk.
"""

from __future__ import annotations

import logging
import random
import uuid

from celery import Task
from celery.utils.time import get_exponential_backoff_interval

from face_emotions.jobs.protocol import CLASSIFY_TASK
from face_emotions.jobs.recovery import fail_chunk
from face_emotions.ops.log_format import job_context
from face_emotions.ops.redaction import redact
from face_emotions.serving.chunk_classifier import chunk_attempts
from face_emotions.serving.chunk_classifier import classify_chunk
from face_emotions.serving.chunk_classifier import default_worker_name
from face_emotions.serving.model_holder import ModelUnavailable
from worker.app import app
from worker.app import settings
from worker.runtime import batcher
from worker.runtime import busy
from worker.runtime import detector
from worker.runtime import holder
from worker.runtime import image_loader
from worker.runtime import sessions

log = logging.getLogger(__name__)

MODEL_RETRY_SECONDS = 10
MODEL_RETRIES = 360  # an hour without a model before giving up on a chunk
#: Backoff of a failed chunk: 2, 4, 8, 16 ... seconds (x 0.5-1.5 jitter), at most a minute.
RETRY_BASE_SECONDS = 2
RETRY_MAX_SECONDS = 60
#: Retry delay when the failure came before the delivery was counted (database unreachable).
UNCOUNTED_RETRY_SECONDS = 10.0
REASON_MAX_CHARS = 300


@app.task(
    name=CLASSIFY_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=MODEL_RETRIES,
)
def classify_chunk_task(self: Task, job_id: str, image_ids: list[int]) -> dict:
    with busy():  # the heartbeat says "busy" while this runs
        return _classify(self, job_id, image_ids)


def _classify(task: Task, job_id: str, image_ids: list[int]) -> dict:
    try:
        outcome = classify_chunk(
            sessions(),
            holder(),
            uuid.UUID(job_id),
            image_ids,
            settings=settings,
            load_image=image_loader(),
            batcher=batcher(),
            detector=detector,
        )
    except ModelUnavailable as exc:
        log.warning(
            "job %s: no model to serve yet (%s); retrying", job_id, exc, extra=job_context(job_id)
        )
        raise task.retry(exc=exc, countdown=MODEL_RETRY_SECONDS) from exc
    except Exception as exc:
        return _after_failure(task, job_id, image_ids, exc)
    log.info(
        "job %s chunk: %d ok, %d failed, batches %s, versions %s, %.2fs, delivery %d%s",
        job_id,
        outcome.succeeded,
        outcome.failed,
        outcome.forward_batches,
        sorted(outcome.model_versions),
        outcome.seconds,
        outcome.attempt,
        f" (skipped: {outcome.skipped})" if outcome.skipped else "",
        extra=job_context(
            job_id,
            model_version=max(outcome.model_versions, default=None),
            worker=default_worker_name(),
        ),
    )
    return outcome.as_dict()


def _after_failure(task: Task, job_id: str, image_ids: list[int], exc: Exception) -> dict:
    """Retry a failed chunk with backoff, or give up on it once its deliveries are spent.

    The count lives in the database (``images.attempts``), not in the message, so that it
    adds up over every way a chunk comes back: Celery retries, redeliveries after a lost
    worker, sweeper re-enqueues.
    """
    reason = failure_reason(exc)
    job = uuid.UUID(job_id)
    try:
        attempts = chunk_attempts(sessions(), job, image_ids)
    except Exception as db_exc:  # the database is away too: not the chunk's fault
        log.warning(
            "job %s chunk failed (%s) and its state is unreadable: %s", job_id, reason, db_exc
        )
        raise task.retry(exc=exc, countdown=jittered(UNCOUNTED_RETRY_SECONDS)) from exc
    if attempts is None:
        log.info("job %s chunk failed (%s), but its images have results by now", job_id, reason)
        return {"job_id": job_id, "skipped": "every image already has a result", "error": reason}
    if attempts >= settings.max_chunk_attempts:
        try:
            failed = fail_chunk(
                sessions(),
                job,
                image_ids,
                f"gave up after {attempts} deliveries; last error: {reason}",
                worker=default_worker_name(),
            )
        except Exception as db_exc:
            # The next delivery finds the chunk out of deliveries and gives up itself.
            log.warning("job %s: could not fail the chunk's images: %s", job_id, db_exc)
            raise task.retry(exc=exc, countdown=jittered(UNCOUNTED_RETRY_SECONDS)) from exc
        log.error(
            "job %s chunk: gave up after %d deliveries, %d images failed: %s",
            job_id,
            attempts,
            failed,
            reason,
            exc_info=exc,
            extra=job_context(job_id),
        )
        return {"job_id": job_id, "gave_up": True, "failed": failed, "error": reason}
    # attempts == 0: it failed before the delivery was counted (database trouble at start).
    countdown = retry_countdown(attempts) if attempts else jittered(UNCOUNTED_RETRY_SECONDS)
    log.warning(
        "job %s chunk failed on delivery %d of %d (%s); retrying in %.1fs",
        job_id,
        attempts,
        settings.max_chunk_attempts,
        reason,
        countdown,
        exc_info=exc,
        extra=job_context(job_id),  # the reason users see is one line; operators need the traceback
    )
    raise task.retry(exc=exc, countdown=countdown) from exc


def retry_countdown(attempts: int) -> float:
    """Exponential backoff with jitter, so that chunks failing together do not come back
    together (a database or store that just recovered is not hit by all of them at once)."""
    base = get_exponential_backoff_interval(
        RETRY_BASE_SECONDS, max(attempts - 1, 0), RETRY_MAX_SECONDS
    )
    return jittered(base)


def jittered(seconds: float) -> float:
    return seconds * random.uniform(0.5, 1.5)


def failure_reason(exc: BaseException) -> str:
    """What users see for images given up on: the exception type and the first line of its
    message (SQL and parameters come on later lines), credentials in URLs masked, bounded."""
    lines = str(exc).strip().splitlines()
    text = redact(lines[0].strip()) if lines else ""
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    return reason if len(reason) <= REASON_MAX_CHARS else reason[: REASON_MAX_CHARS - 3] + "..."
