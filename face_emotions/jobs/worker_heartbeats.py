"""Heartbeats: which process serves which model version, which trainers are up, who is alive.

Every inference pool process and every trainer keeps a row in ``workers`` fresh, busy or idle,
every :data:`HEARTBEAT_SECONDS`; a process that stops deletes its row, and one that dies without
doing so drops out of :func:`live_workers` after :data:`LIVENESS_SECONDS`. Pool processes also
write their row from the chunk they classify (with the images they processed), so a version
change shows at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from datetime import timedelta

from sqlalchemy import delete
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs.result_writes import _insert_for
from face_emotions.jobs.schema import WorkerState
from face_emotions.jobs.schema import utcnow

log = logging.getLogger(__name__)

#: How often an idle process reports that it is alive.
HEARTBEAT_SECONDS = 15.0
#: A process not seen for this long is gone (killed without a goodbye, or its host is down).
LIVENESS_SECONDS = 60.0
INFERENCE = "inference"
TRAINING = "training"


def touch_worker(
    session: Session,
    name: str,
    *,
    model_version: int | None,
    device: str | None,
    backend: str | None,
    processed: int = 0,
    role: str = INFERENCE,
    data_root: str | None = None,
) -> None:
    """Upsert the process's heartbeat row (what it serves, how much it has done)."""
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
        role=role,
        data_root=data_root,
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
                "role": role,
                "data_root": data_root,
            },
        )
    )


def forget_worker(session: Session, name: str) -> None:
    session.execute(delete(WorkerState).where(WorkerState.name == name))


def live_workers(
    session: Session, *, since: datetime | None = None, role: str | None = None
) -> list[WorkerState]:
    """Processes seen since ``since`` (default: within :data:`LIVENESS_SECONDS`)."""
    since = since or utcnow() - timedelta(seconds=LIVENESS_SECONDS)
    query = select(WorkerState).where(WorkerState.last_seen >= since)
    if role is not None:
        query = query.where(WorkerState.role == role)
    return list(session.scalars(query.order_by(WorkerState.name)))


@dataclass(frozen=True)
class Beat:
    """What a heartbeat says besides "alive"."""

    model_version: int | None = None
    device: str | None = None
    backend: str | None = None


class Heartbeat:
    """A daemon thread that keeps one process's row fresh until :meth:`stop` deletes it."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        name: str,
        *,
        role: str,
        data_root: str | None = None,
        state: Callable[[], Beat] = Beat,
        period: float = HEARTBEAT_SECONDS,
    ) -> None:
        self.sessions = sessions
        self.name = name
        self.role = role
        self.data_root = data_root
        self.state = state
        self.period = period
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> None:
        state = self.state()
        with self.sessions() as session:
            touch_worker(
                session,
                self.name,
                model_version=state.model_version,
                device=state.device,
                backend=state.backend,
                role=self.role,
                data_root=self.data_root,
            )
            session.commit()

    def stop(self) -> None:
        """Stop beating and say goodbye (best effort: a dead database just lets it expire)."""
        self._stop.set()
        try:
            with self.sessions() as session:
                forget_worker(session, self.name)
                session.commit()
        except Exception as exc:
            log.debug("heartbeat %s: goodbye not written: %s", self.name, exc)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.beat()
            except Exception as exc:  # the database is away: try again next period
                log.debug("heartbeat %s failed: %s", self.name, exc)
            self._stop.wait(self.period)
