"""Worker heartbeats: which worker serves which model version, and which workers are alive."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from face_emotions.jobs.result_writes import _insert_for
from face_emotions.jobs.schema import WorkerState
from face_emotions.jobs.schema import utcnow


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
