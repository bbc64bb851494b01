"""Heartbeats: which process serves which model version, which trainers are up, who is alive.

Every inference pool process and every trainer keeps a row in ``workers`` fresh, busy or idle,
from a thread of its own (:class:`Heartbeat`): an idle worker is as visible as a busy one. A
process that stops deletes its row; one that dies without doing so (SIGKILL, OOM, a lost host)
drops out of :func:`live_workers` once it has been silent for ``EMOTIONS_WORKER_STALE_SECONDS``
(default :data:`LIVENESS_SECONDS`), and beats come :func:`heartbeat_period` apart so that a
live process is never mistaken for a dead one. Pool processes also write their row from the
chunk they classify (with the images they processed), so a version change shows at once.

Inference rows say ``idle`` or ``busy`` (:data:`IDLE`, :data:`BUSY`); trainers say neither.
A prefork pool process loads its model with its first task, so an idle one that has not worked
yet reports no model version: it is alive, it has just not loaded anything.
"""

from __future__ import annotations

import logging
import threading
import time
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

#: How often an idle process reports that it is alive (less when the stale time is short).
HEARTBEAT_SECONDS = 15.0
#: Default of ``EMOTIONS_WORKER_STALE_SECONDS``: a process not seen for this long is gone
#: (killed without a goodbye, or its host is down).
LIVENESS_SECONDS = 60.0
#: Beats per stale period: three beats may be lost (a slow database) before a process vanishes.
BEATS_PER_STALE_PERIOD = 4
#: A state change is reported once it has lasted this long, so that a stream of short tasks
#: does not turn into a database write per task.
SETTLE_SECONDS = 1.0
INFERENCE = "inference"
TRAINING = "training"
#: What an inference process is doing: waiting for a task, or working on one.
IDLE = "idle"
BUSY = "busy"


def heartbeat_period(stale_seconds: float = LIVENESS_SECONDS) -> float:
    """Seconds between two beats of a process that must stay listed with this stale time."""
    return max(0.25, min(HEARTBEAT_SECONDS, stale_seconds / BEATS_PER_STALE_PERIOD))


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
    state: str | None = None,
) -> None:
    """Upsert the process's heartbeat row (what it serves, whether it is working, how much it
    has done)."""
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
        state=state,
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
                "state": state,
            },
        )
    )


def forget_worker(session: Session, name: str) -> None:
    session.execute(delete(WorkerState).where(WorkerState.name == name))


def live_workers(
    session: Session,
    *,
    since: datetime | None = None,
    role: str | None = None,
    stale_seconds: float = LIVENESS_SECONDS,
) -> list[WorkerState]:
    """Processes seen since ``since`` (default: within the last ``stale_seconds``)."""
    since = since or utcnow() - timedelta(seconds=stale_seconds)
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
    #: :data:`IDLE` or :data:`BUSY` for inference processes, ``None`` for trainers.
    state: str | None = None


class Heartbeat:
    """A daemon thread that keeps one process's row fresh until :meth:`stop` deletes it.

    It beats every ``period`` seconds whatever the process does, so an idle process stays
    listed; :meth:`changed` makes it report a new state (busy, idle) without waiting for the
    period, once the state has lasted :data:`SETTLE_SECONDS`.
    """

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
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="heartbeat", daemon=True)
        self._thread.start()

    def beat(self) -> Beat:
        """Write the row now; returns what it said."""
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
                state=state.state,
            )
            session.commit()
        return state

    def changed(self) -> None:
        """The process's state changed: report it soon rather than at the next period."""
        self._wake.set()

    def stop(self) -> None:
        """Stop beating and say goodbye (best effort: a dead database just lets it expire)."""
        self._stop.set()
        self._wake.set()
        try:
            with self.sessions() as session:
                forget_worker(session, self.name)
                session.commit()
        except Exception as exc:
            log.debug("heartbeat %s: goodbye not written: %s", self.name, exc)

    def _loop(self) -> None:
        reported: Beat | None = None
        while not self._stop.is_set():
            try:
                reported = self.beat()
            except Exception as exc:  # the database is away: try again next period
                log.debug("heartbeat %s failed: %s", self.name, exc)
            self._wait(reported)

    def _wait(self, reported: Beat | None) -> None:
        """Until the period is over, or a change from ``reported`` has lasted a moment."""
        deadline = time.monotonic() + self.period
        while not self._stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0 or not self._wake.wait(left):
                return
            self._wake.clear()
            if self._stop.wait(SETTLE_SECONDS) or self.state() != reported:
                return
