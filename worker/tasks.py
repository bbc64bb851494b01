"""Celery tasks: decode arguments, call the core chunk classifier, map failures to retries."""

from __future__ import annotations

import logging
import uuid

from human_face_emotions.chunk_classifier import classify_chunk
from human_face_emotions.model_holder import ModelUnavailable
from worker.app import CLASSIFY_TASK, app, settings
from worker.runtime import holder, image_loader, sessions

log = logging.getLogger(__name__)

MODEL_RETRY_SECONDS = 10
MODEL_RETRIES = 360  # an hour without a model before giving up on a chunk


@app.task(
    name=CLASSIFY_TASK,
    bind=True,
    acks_late=True,
    reject_on_worker_lost=True,
    max_retries=MODEL_RETRIES,
)
def classify_chunk_task(self, job_id: str, image_ids: list[int]) -> dict:
    try:
        outcome = classify_chunk(
            sessions(),
            holder(),
            uuid.UUID(job_id),
            image_ids,
            settings=settings,
            load_image=image_loader(),
        )
    except ModelUnavailable as exc:
        log.warning("job %s: no model to serve yet (%s); retrying", job_id, exc)
        raise self.retry(exc=exc, countdown=MODEL_RETRY_SECONDS) from exc
    log.info(
        "job %s chunk: %d ok, %d failed, batches %s, versions %s, %.2fs%s",
        job_id,
        outcome.succeeded,
        outcome.failed,
        outcome.forward_batches,
        sorted(outcome.model_versions),
        outcome.seconds,
        f" (skipped: {outcome.skipped})" if outcome.skipped else "",
    )
    return outcome.as_dict()
