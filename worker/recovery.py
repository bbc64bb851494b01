"""The recovery sweeper, run by a thread in every inference worker's main process.

Running it inside the workers means there is nothing more to deploy or scale (no beat
service): wherever chunks can be classified, lost chunks are also found. A lock on the broker
(``SET NX PX``, expiring after one sweep period and never released) lets one worker of the
fleet sweep per period; the database claim in :func:`face_emotions.jobs.recovery.sweep` keeps
even overlapping sweeps from doing anything twice, so the lock only saves work.

While tasks wait in the inference queue, a job without progress is most likely just waiting its
turn, and copies of its chunks would only queue up behind the originals. So a sweep uses
``EMOTIONS_STALL_SECONDS`` only when the queue is empty (every worker has caught up: a chunk
still missing then is lost, or stuck in a worker), and ``EMOTIONS_VISIBILITY_TIMEOUT`` (the
longest a chunk may take, after which Redis itself would redeliver) while it is not, so a job
behind a long backlog is neither sent again and again nor starved for ever.

Each sweep also sends the training runs the broker never had (accepted during an outage), and
every few minutes removes uploads that belong to no job (an API killed mid-upload) once they
are ``EMOTIONS_ORPHAN_UPLOAD_GRACE_SECONDS`` old.

The thread lives in the main process, not in a pool process: it must keep sweeping while every
pool process is busy with a long chunk, and the main process is never killed for a task. It has
its own database engine, which pool processes forked later must not use (see
:meth:`RecoverySweeper.forget_after_fork`).
"""

from __future__ import annotations

import logging
import math
import os
import secrets
import threading
from typing import Any

from kombu.exceptions import ChannelError
from sqlalchemy import Engine
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.data.storage import Storage
from face_emotions.jobs.broker import BrokerClient
from face_emotions.jobs.database import create_db_engine
from face_emotions.jobs.database import session_factory
from face_emotions.jobs.orphan_uploads import remove_orphan_uploads
from face_emotions.jobs.protocol import INFERENCE_QUEUE
from face_emotions.jobs.recovery import SweepReport
from face_emotions.jobs.recovery import dispatch_stranded_runs
from face_emotions.jobs.recovery import sweep
from face_emotions.settings import Settings

log = logging.getLogger(__name__)

LOCK_KEY = "face-emotions:recovery-sweeper"
#: Uploads are checked for a job at most this often (listing a bucket costs requests), and at
#: least every ``EMOTIONS_ORPHAN_UPLOAD_GRACE_SECONDS`` when that is shorter.
ORPHAN_CHECK_SECONDS = 300.0


class RecoverySweeper:
    """Calls :func:`sweep` every ``settings.sweep_seconds`` on a daemon thread."""

    def __init__(self, broker: BrokerClient, settings: Settings) -> None:
        self.broker = broker
        self.settings = settings
        self._engine: Engine | None = None
        self._sessions: sessionmaker[Session] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        # Sweeps since uploads were last checked for a job; the first sweep checks.
        self._sweeps_since_orphans = 1 << 30

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="recovery-sweeper", daemon=True)
        self._thread.start()
        log.info(
            "recovery sweeper: every %.0fs, re-enqueues jobs stalled for %.0fs, "
            "at most %d deliveries per chunk",
            self.settings.sweep_seconds,
            self.settings.stall_seconds,
            self.settings.max_chunk_attempts,
        )

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if self._engine is not None and os.getpid() == self._pid:
            self._engine.dispose()

    def forget_after_fork(self) -> None:
        """In a freshly forked pool process: drop the inherited engine without touching its
        connections, which still belong to the main process (closing them here would end
        the main process's sessions on the server)."""
        if self._engine is not None and os.getpid() != self._pid:
            self._engine.dispose(close=False)
            self._engine = None
            self._sessions = None
        self._thread = None

    # -- one sweep -----------------------------------------------------------------------------

    def run_once(self) -> SweepReport | None:
        """Sweep now if no other worker did during this period; ``None`` when skipped."""
        with self.broker.connection() as connection:
            channel = connection.default_channel
            if not self._take_lock(channel):
                return None
            waiting = self._waiting(channel)
        stall = self.settings.stall_seconds
        if waiting:
            stall = max(stall, float(self.settings.visibility_timeout))
        report = sweep(
            self.sessions(),
            self.broker.send_chunk,
            stall_seconds=stall,
            max_attempts=self.settings.max_chunk_attempts,
        )
        report.training_runs_sent, error = dispatch_stranded_runs(
            self.sessions(), self.broker.send_training_run
        )
        report.enqueue_error = report.enqueue_error or error
        report.orphan_uploads_removed = self._remove_orphan_uploads()
        if not report.idle:
            log.info("recovery sweep (%d tasks waiting): %s", waiting, report.as_dict())
        return report

    def _remove_orphan_uploads(self) -> list[str]:
        """Every ``min(grace, 5 min)`` (at least every sweep): uploads without a job."""
        grace = self.settings.orphan_upload_grace_seconds
        every = max(1, math.ceil(min(grace, ORPHAN_CHECK_SECONDS) / self.settings.sweep_seconds))
        self._sweeps_since_orphans += 1
        if self._sweeps_since_orphans < every:
            return []
        self._sweeps_since_orphans = 0
        try:
            storage = Storage.from_url(
                self.settings.resolved_storage_url, s3_endpoint_url=self.settings.s3_endpoint_url
            )
            report = remove_orphan_uploads(self.sessions(), storage, grace_seconds=grace)
        except Exception as exc:  # storage or database away: the next check tries again
            log.warning("could not check for orphaned uploads: %s", exc)
            return []
        return report.removed

    def sessions(self) -> sessionmaker[Session]:
        if self._sessions is None:
            self._engine = create_db_engine(self.settings.resolved_database_url)
            self._sessions = session_factory(self._engine)
        return self._sessions

    def _take_lock(self, channel: Any) -> bool:
        """One sweep per period across the fleet; sweeps anyway on a broker without keys."""
        client = getattr(channel, "client", None)
        if client is None:  # not Redis (tests with an in-memory broker): no fleet to share
            return True
        ttl_ms = max(int(self.settings.sweep_seconds * 1000), 100)
        return bool(client.set(LOCK_KEY, secrets.token_hex(8), nx=True, px=ttl_ms))

    def _waiting(self, channel: Any) -> int:
        """Tasks waiting in the inference queue (not those being worked on)."""
        try:
            return int(channel.queue_declare(queue=INFERENCE_QUEUE, passive=True).message_count)
        except ChannelError:  # Redis drops an empty list: no queue is an empty queue
            return 0

    def _loop(self) -> None:
        while not self._stop.wait(self.settings.sweep_seconds):
            try:
                self.run_once()
            except Exception as exc:  # broker or database away: try again next period
                log.warning("recovery sweep failed: %s", exc)
