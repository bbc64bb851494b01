"""Rows -> JSON-ready dicts, in the shapes the schemas of :mod:`api.schemas` document."""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from datetime import UTC
from datetime import datetime
from typing import Any

from flask import url_for
from sqlalchemy import select
from sqlalchemy.orm import Session

from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Job
from face_emotions.jobs.schema import Result
from face_emotions.labels import EMOTIONS
from face_emotions.serving.seed_format import rounded_face


def aware(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes for timezone-aware columns; they were stored as UTC."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def job_links(job_id: uuid.UUID) -> dict[str, str]:
    return {
        "self": url_for("jobs.get_job", job_id=job_id),
        "results": url_for("jobs.job_results", job_id=job_id),
        "summary": url_for("jobs.job_summary", job_id=job_id),
    }


def job_dict(job: Job, model_versions: list[int], *, now: datetime | None = None) -> dict:
    created, started, finished = (
        aware(job.created_at),
        aware(job.started_at),
        aware(job.finished_at),
    )
    processed = job.done + job.failed
    duration: float | None = None
    rate: float | None = None
    if started is not None:
        end = finished or now or datetime.now(UTC)
        duration = max((end - started).total_seconds(), 0.0)
        rate = processed / duration if duration > 0 else None
    return {
        "id": str(job.id),
        "status": str(job.status),
        "source_type": job.source_type,
        "source": job.source,
        "batch_size": job.batch_size,
        "model_version": job.model_version,
        "face_policy": job.face_policy,
        "total": job.total,
        "done": job.done,
        "failed": job.failed,
        "progress": min(processed / job.total, 1.0) if job.total else 0.0,
        "model_versions": model_versions,
        "created_at": created,
        "started_at": started,
        "finished_at": finished,
        "duration_seconds": None if duration is None else round(duration, 3),
        "images_per_second": None if rate is None else round(rate, 3),
        "error": job.error,
        "links": job_links(job.id),
    }


def model_versions_by_job(
    session: Session, job_ids: Iterable[uuid.UUID]
) -> dict[uuid.UUID, list[int]]:
    """``db.jobs.model_versions_used`` for a whole page of jobs in one query (no N+1)."""
    ids = list(job_ids)
    found: dict[uuid.UUID, list[int]] = {job_id: [] for job_id in ids}
    if not ids:
        return found
    rows = session.execute(
        select(Result.job_id, Result.model_version)
        .where(Result.job_id.in_(ids), Result.model_version.is_not(None))
        .distinct()
    )
    for job_id, version in rows:
        if version is None:  # excluded by the query; this narrows the nullable column
            continue
        found.setdefault(job_id, []).append(int(version))
    return {job_id: sorted(versions) for job_id, versions in found.items()}


def result_dict(image: Image, result: Result) -> dict[str, Any]:
    """The seed's per-image record (rounded like ``prediction_record``) plus status, version
    and faces: the image-level fields describe the largest face, ``faces`` lists them all."""
    probabilities = result.probabilities
    record: dict[str, Any] = {
        "image_path": image.path,
        "status": result.status,
        "predicted_class": result.predicted_class,
        "predicted_emotion": result.predicted_emotion,
        "confidence": None if result.confidence is None else round(result.confidence, 4),
        "all_probabilities": (
            None
            if probabilities is None
            else {
                name: round(float(probabilities[name]), 4)
                for name in EMOTIONS
                if probabilities.get(name) is not None
            }
        ),
        "model_version": result.model_version,
        "faces_found": result.faces_found,
        "image_size": (
            None
            if result.image_width is None or result.image_height is None
            else [result.image_width, result.image_height]
        ),
        "faces": [rounded_face(face) for face in result.faces or ()],
    }
    if result.status != "succeeded":
        record["error"] = result.error
    return record
