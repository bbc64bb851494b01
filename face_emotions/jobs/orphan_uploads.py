"""Uploads that belong to no job: what an API killed mid-upload leaves in storage.

The API writes a job's images below ``jobs/<job_id>/`` *before* it commits the job's row (the
row must name images that exist), and removes them again when the request fails. A process
killed between the two (SIGKILL, out of memory, a host lost) removes nothing: the files stay,
and no row says they are there. The recovery sweeper removes such a prefix once nothing in it
changed for ``grace_seconds``; a prefix whose job row exists is never touched, nor is a name
below ``jobs/`` that is not a job id (not ours).

The grace period is what keeps an upload in progress safe: its newest file is seconds old
until its row is committed.

Core library: no Flask, no Celery.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from functools import partial

from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.data.storage import Storage
from face_emotions.jobs.database import with_db_retry
from face_emotions.jobs.schema import Job

log = logging.getLogger(__name__)

#: Where the API stores a job's uploads: ``<storage>/jobs/<job_id>/``.
UPLOADS_PREFIX = "jobs"
#: Job ids looked up per query.
LOOKUP_BATCH = 500
#: Prefixes removed per pass, so one pass stays short after a long run of crashes.
DEFAULT_REMOVE_LIMIT = 200


@dataclass
class OrphanReport:
    """What one pass removed (``jobs/<id>`` keys) and what it kept for now."""

    removed: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    too_recent: int = 0  # orphans still inside the grace period (perhaps an upload running)

    def as_dict(self) -> dict:
        return asdict(self)


def remove_orphan_uploads(
    sessions: sessionmaker[Session],
    storage: Storage,
    *,
    grace_seconds: float,
    now: float | None = None,
    limit: int = DEFAULT_REMOVE_LIMIT,
) -> OrphanReport:
    """Remove every ``jobs/<id>`` prefix with no job ``<id>`` that has not changed for
    ``grace_seconds`` (``now``: POSIX time, for tests). Each removal is logged."""
    now = time.time() if now is None else now
    report = OrphanReport()
    candidates = _job_ids(storage.list_names(UPLOADS_PREFIX))
    if not candidates:
        return report
    known = with_db_retry(partial(_existing, sessions, list(candidates)))
    for job_id, name in sorted(candidates.items(), key=lambda item: item[1]):
        if job_id in known:
            continue
        if len(report.removed) >= limit:
            break
        key = f"{UPLOADS_PREFIX}/{name}"
        usage = storage.usage(key)
        if usage.newest is not None and now - usage.newest < grace_seconds:
            report.too_recent += 1
            continue
        if with_db_retry(partial(_existing, sessions, [job_id])):  # committed meanwhile
            continue
        storage.delete_prefix(key)
        report.removed.append(key)
        report.files += usage.files
        report.bytes += usage.bytes
        log.warning(
            "removed orphaned upload %s/%s: %d files, %d bytes, no job %s (last change %s)",
            storage.url,
            key,
            usage.files,
            usage.bytes,
            job_id,
            "unknown" if usage.newest is None else f"{now - usage.newest:.0f}s ago",
        )
    return report


def _job_ids(names: Sequence[str]) -> dict[uuid.UUID, str]:
    """The names that are job ids (the API's ``str(uuid4())``), by id."""
    ids: dict[uuid.UUID, str] = {}
    for name in names:
        try:
            job_id = uuid.UUID(name)
        except ValueError:
            continue
        if str(job_id) == name:
            ids[job_id] = name
    return ids


def _existing(sessions: sessionmaker[Session], ids: list[uuid.UUID]) -> set[uuid.UUID]:
    """Which of ``ids`` have a job row."""
    found: set[uuid.UUID] = set()
    with sessions() as session:
        for start in range(0, len(ids), LOOKUP_BATCH):
            batch = ids[start : start + LOOKUP_BATCH]
            found.update(session.scalars(select(Job.id).where(Job.id.in_(batch))))
    return found
