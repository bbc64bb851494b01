"""The next chunk's first micro-batch, decoded while this chunk's last one runs through the model.

A chunk decodes micro-batch k+1 while k runs through the model, but its first micro-batch
had nothing to hide behind: every chunk started with the model idle while 32 images were
decoded (48 ms of every 128-image chunk on a 2-core worker, 2.5 % of a 1,000-image job).

A pool process cannot know its next task (prefork: the worker's main process holds the
reserved message), so it guesses: the job's first chunk after this one whose images no
delivery has started and that have no result
(:func:`~face_emotions.jobs.result_writes.next_undelivered_images`). With one worker on the job
that is the next task; with several, the chunks other workers have started are passed over.

A guess writes nothing: it is a decode, used only by a chunk whose first micro-batch is
exactly the guessed one (same database, job, face policy, image ids and locations) and
dropped otherwise. After a miss the process stops guessing for the next 1, 3, 7 ... chunks
(at most 15), so that a worker serving interleaved jobs wastes little; a hit resets that.
Guesses are only made while the process runs one chunk at a time (the prefork pool): with
``--pool threads`` other chunks keep the cores busy anyway, and they would take each other's.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from collections.abc import Iterator
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

from face_emotions.ops import inference_metrics as metrics
from face_emotions.serving.decode_ahead import PendingBatch

log = logging.getLogger(__name__)

#: Chunks skipped after consecutive misses: 2**misses - 1, at most this many.
MAX_SKIPPED_CHUNKS = 15

#: Finds the guessed micro-batch (image ids and locations, empty when the job has none left)
#: and starts decoding it; runs on the look-ahead's own thread.
Guess = Callable[[], PendingBatch | None]


@dataclass
class _Slot:
    database: int  # id() of the session factory: a guess is only good for its own database
    job_id: uuid.UUID
    policy: str
    guess: Future[PendingBatch | None]


class ChunkLookahead:
    """One process's guess at its next chunk's first micro-batch (at most one held)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._slot: _Slot | None = None
        self._running = 0
        self._misses = 0
        self._skip = 0
        self._thread: ThreadPoolExecutor | None = None

    @contextmanager
    def chunk(self) -> Iterator[bool]:
        """Around one chunk; says whether it is the only one this process runs now."""
        with self._lock:
            self._running += 1
            alone = self._running == 1
        try:
            yield alone
        finally:
            with self._lock:
                self._running -= 1

    def start(self, database: int, job_id: uuid.UUID, policy: str, guess: Guess) -> bool:
        """Guess the next chunk's first micro-batch on a thread of its own; ``False`` when
        this chunk shares the process or recent guesses missed."""
        with self._lock:
            if self._running != 1:
                return False
            if self._skip:
                self._skip -= 1
                return False
            self._drop(self._slot)
            if self._thread is None:
                self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lookahead")
            self._slot = _Slot(database, job_id, policy, self._thread.submit(_guarded, guess))
            return True

    def take(
        self,
        database: int,
        job_id: uuid.UUID,
        policy: str,
        keys: list[int],
        locations: list[str],
    ) -> PendingBatch | None:
        """The guessed micro-batch if it is exactly this chunk's first one, else ``None``
        (and any guess held is dropped)."""
        with self._lock:
            slot, self._slot = self._slot, None
        if slot is None:
            return None
        # Started before the previous chunk's last forward pass: found (and submitted) by now.
        batch = slot.guess.result()
        if batch is None:  # the job had no chunk left to guess: no miss
            return None
        if (slot.database, slot.job_id, slot.policy) == (database, job_id, policy) and (
            batch.keys == keys and batch.paths == locations
        ):
            self._scored(hit=True)
            return batch
        batch.cancel()
        self._scored(hit=False)
        return None

    def _scored(self, *, hit: bool) -> None:
        with self._lock:
            self._misses = 0 if hit else self._misses + 1
            self._skip = min(2**self._misses - 1, MAX_SKIPPED_CHUNKS)
        metrics.count_lookahead("hit" if hit else "miss")

    @staticmethod
    def _drop(slot: _Slot | None) -> None:
        """Let a guess nobody will use go: its decodes that have not started are cancelled."""
        if slot is not None:
            slot.guess.add_done_callback(_cancel_guess)


def _guarded(guess: Guess) -> PendingBatch | None:
    """A guess that fails (database away, test torn down) is no guess, never an error."""
    try:
        return guess()
    except Exception as exc:
        log.debug("look-ahead of the next chunk failed: %s", exc)
        return None


def _cancel_guess(future: Future[PendingBatch | None]) -> None:
    batch = future.result()
    if batch is not None:
        batch.cancel()


#: The worker process's look-ahead (a forked pool process starts with an empty one: the
#: parent never runs a chunk before forking).
LOOKAHEAD = ChunkLookahead()
