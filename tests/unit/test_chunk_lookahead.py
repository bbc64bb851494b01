"""The next chunk's first micro-batch, decoded during the previous chunk's last forward pass.

A chunk used to begin by decoding its first micro-batch with the model idle. A pool process
now guesses its next chunk (the job's first one no delivery has started) and decodes that
micro-batch beside its own last forward pass; the next chunk uses it only if it is exactly its
first micro-batch. These tests follow every image through the loader: a hit decodes nothing
twice, a miss changes no result, and guesses never write.
"""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import func
from sqlalchemy import select
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs.schema import Result
from face_emotions.serving import chunk_classifier
from face_emotions.serving.chunk_classifier import classify_chunk
from face_emotions.serving.chunk_lookahead import ChunkLookahead
from face_emotions.serving.decode_ahead import DecodePool
from face_emotions.serving.decode_ahead import iter_decoded_batches
from face_emotions.settings import Settings
from tests.unit.test_sweeper import FakeHolder
from tests.unit.test_sweeper import attempts_of
from tests.unit.test_sweeper import make_job
from tests.unit.test_sweeper import set_attempts

JOB = uuid.uuid4()


@pytest.fixture
def sessions(jobs_db: sessionmaker[Session]) -> sessionmaker[Session]:
    return jobs_db


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(var_dir=tmp_path, decode_threads=2)


@pytest.fixture
def lookahead(monkeypatch: pytest.MonkeyPatch) -> ChunkLookahead:
    """A fresh look-ahead: no guess or miss left by another test of this process."""
    fresh = ChunkLookahead()
    monkeypatch.setattr(chunk_classifier, "LOOKAHEAD", fresh)
    return fresh


class Decodes:
    """Every micro-batch submitted for decoding, by whom: ``guess`` (the look-ahead's thread)
    or ``chunk`` (the chunk's own decode-ahead); and every image the loader decoded."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.submitted: list[tuple[str, list[str]]] = []
        self.loaded: list[str] = []
        self._lock = threading.Condition()
        real = DecodePool.submit

        def submit(pool, paths, keys, **kwargs):
            who = "guess" if threading.current_thread().name.startswith("lookahead") else "chunk"
            with self._lock:
                self.submitted.append((who, list(paths)))
                self._lock.notify_all()
            return real(pool, paths, keys, **kwargs)

        monkeypatch.setattr(DecodePool, "submit", submit)

    def __call__(self, location: str, max_pixels: int) -> PILImage.Image:
        with self._lock:
            self.loaded.append(location)
        return PILImage.new("RGB", (8, 8))

    def by(self, who: str) -> list[list[str]]:
        return [paths for submitter, paths in self.submitted if submitter == who]

    def guesses(self, count: int) -> list[list[str]]:
        """The guesses, once ``count`` were submitted: a chunk returns before the guess it
        started has found its images (the next chunk waits for it; a test must too)."""
        with self._lock:
            assert self._lock.wait_for(lambda: len(self.by("guess")) >= count, timeout=30)
            return self.by("guess")


@pytest.fixture
def decodes(monkeypatch: pytest.MonkeyPatch) -> Decodes:
    return Decodes(monkeypatch)


def run(sessions, settings, job_id, image_ids, loader: Decodes):
    return classify_chunk(
        sessions, FakeHolder(), job_id, image_ids, settings=settings, load_image=loader
    )


def at(*positions: int) -> list[str]:
    """Locations of ``make_job``'s images at these positions."""
    return [f"/nowhere/{i}.png" for i in positions]


def results(sessions, job_id) -> int:
    with sessions() as session:
        return session.scalar(select(func.count()).where(Result.job_id == job_id)) or 0


def test_the_next_chunks_first_micro_batch_is_decoded_during_this_chunk_and_used(
    sessions, settings, lookahead, decodes
) -> None:
    job_id, chunks = make_job(sessions, 12, 4)  # batch size 2: chunks of two micro-batches
    for number in sorted(chunks):
        assert run(sessions, settings, job_id, chunks[number], decodes).succeeded == 4
    # Chunk 0 guessed chunk 1's first micro-batch, chunk 1 chunk 2's; chunk 2 found none.
    assert decodes.guesses(2) == [at(4, 5), at(8, 9)]
    assert decodes.by("chunk") == [at(0, 1), at(2, 3), at(6, 7), at(10, 11)]
    assert sorted(decodes.loaded) == sorted(at(*range(12)))  # no image decoded twice
    assert results(sessions, job_id) == 12


def test_a_guess_writes_nothing(sessions, settings, lookahead, decodes) -> None:
    job_id, chunks = make_job(sessions, 8, 4)
    run(sessions, settings, job_id, chunks[0], decodes)
    assert decodes.guesses(1) == [at(4, 5)]
    assert results(sessions, job_id) == 4
    assert attempts_of(sessions, job_id) == [1] * 4 + [0] * 4  # chunk 1 not delivered


def test_chunks_another_worker_started_are_passed_over(
    sessions, settings, lookahead, decodes
) -> None:
    job_id, chunks = make_job(sessions, 12, 4)
    set_attempts(sessions, chunks[1], 1)  # another worker is on chunk 1
    run(sessions, settings, job_id, chunks[0], decodes)
    assert decodes.guesses(1) == [at(8, 9)]
    run(sessions, settings, job_id, chunks[2], decodes)
    assert decodes.by("chunk")[-1] == at(10, 11)  # its first micro-batch was ready


def test_a_wrong_guess_is_dropped_and_the_next_chunk_decodes_its_own(
    sessions, settings, lookahead, decodes
) -> None:
    job_a, chunks_a = make_job(sessions, 8, 4)
    job_b, chunks_b = make_job(sessions, 4, 4)
    run(sessions, settings, job_a, chunks_a[0], decodes)
    assert decodes.guesses(1) == [at(4, 5)]  # job a's chunk 1
    outcome = run(sessions, settings, job_b, chunks_b[0], decodes)  # but job b came next
    assert outcome.succeeded == 4 and results(sessions, job_b) == 4
    assert decodes.by("chunk")[-2:] == [at(0, 1), at(2, 3)]  # job b decoded its own
    # The dropped guess is not reused: job a's chunk 1 decodes all it needs.
    outcome = run(sessions, settings, job_a, chunks_a[1], decodes)
    assert outcome.succeeded == 4 and results(sessions, job_a) == 8
    assert decodes.by("chunk")[-2:] == [at(4, 5), at(6, 7)]
    assert decodes.by("guess") == [at(4, 5)]  # the last chunks of both jobs guessed nothing


def test_after_a_miss_the_process_guesses_less_often() -> None:
    lookahead = ChunkLookahead()
    pool = DecodePool(1)

    def guess():
        return pool.submit(["x"], [1], loader=lambda *_: PILImage.new("RGB", (4, 4)))

    def chunk_of(job: uuid.UUID) -> bool:
        """One chunk of ``job`` taking the held guess, then guessing for job JOB."""
        with lookahead.chunk():
            lookahead.take(0, job, "all", [1], ["x"])
            return lookahead.start(0, JOB, "all", guess)

    other = uuid.uuid4()
    assert chunk_of(JOB)  # nothing held yet: guesses
    started = [chunk_of(other) for _ in range(12)]  # every guess misses
    # Misses 1, 2, 3 skip 1, 3, 7 chunks: guesses at chunks 2 (index 1), 6 and 14 ...
    assert started == [False, True, False, False, False, True] + [False] * 6
    assert chunk_of(JOB) is False  # still skipping (the seventh)
    assert chunk_of(JOB)  # guesses again
    assert chunk_of(JOB)  # that guess was a hit, and it guesses again
    assert chunk_of(other) is False  # a miss after a hit skips one chunk only
    assert chunk_of(other)
    pool.shutdown()


def test_no_guess_while_another_chunk_shares_the_process() -> None:
    lookahead = ChunkLookahead()
    with lookahead.chunk() as alone:
        assert alone
        with lookahead.chunk() as alone_too:  # --pool threads: a second chunk at once
            assert not alone_too
            assert not lookahead.start(0, JOB, "all", lambda: None)
        assert lookahead.start(0, JOB, "all", lambda: None)


def test_a_failing_guess_is_no_guess() -> None:
    lookahead = ChunkLookahead()

    def broken():
        raise RuntimeError("database gone")

    with lookahead.chunk():
        assert lookahead.start(0, JOB, "all", broken)
    with lookahead.chunk():
        assert lookahead.take(0, JOB, "all", [1], ["x"]) is None
        # Nothing was guessed, so nothing missed: the next chunk guesses again at once.
        assert lookahead.start(0, JOB, "all", broken)


def test_a_submitted_first_batch_is_used_as_is(tmp_path: Path) -> None:
    paths = [str(tmp_path / f"{i}.png") for i in range(5)]
    for path in paths:
        PILImage.new("RGB", (4, 4)).save(path)
    loads: list[str] = []

    def loader(path: str, max_pixels: int) -> PILImage.Image:
        loads.append(path)
        return PILImage.new("RGB", (4, 4))

    pool = DecodePool(2)
    first = pool.submit(paths[:2], [0, 1], loader=loader)
    batches = list(
        iter_decoded_batches(paths, 2, loader=loader, keys=range(5), pool=pool, first=first)
    )
    assert [b.keys for b in batches] == [[0, 1], [2, 3], [4]]
    assert sorted(loads) == sorted(paths)  # the first two were not decoded again
    # The pool outlives the call: it still decodes.
    assert pool.submit(paths[:1], [9], loader=loader).result().keys == [9]
    pool.shutdown()


def test_a_consumer_that_stops_early_leaves_the_shared_pool_working(tmp_path: Path) -> None:
    pool = DecodePool(1)
    paths = [str(tmp_path / f"{i}.png") for i in range(6)]
    blank = lambda path, max_pixels: PILImage.new("RGB", (4, 4))  # noqa: E731
    for batch in iter_decoded_batches(paths, 2, loader=blank, pool=pool):
        assert len(batch.keys) == 2
        break
    assert pool.submit(paths[:1], [0], loader=blank).result().keys == [0]
    pool.shutdown()


def test_chunks_sharing_the_process_decode_on_threads_of_their_own(
    sessions, settings, lookahead, decodes, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``--pool threads`` several chunks run in one process: each keeps its own decode
    threads (the process's pool would give them fewer between them), and none guesses."""
    shared: list[int] = []
    real = chunk_classifier._decode_pool
    monkeypatch.setattr(chunk_classifier, "_decode_pool", lambda n: shared.append(n) or real(n))
    job_id, chunks = make_job(sessions, 8, 4)
    with lookahead.chunk():  # another chunk is running in this process
        assert run(sessions, settings, job_id, chunks[0], decodes).succeeded == 4
    assert shared == [] and decodes.by("guess") == []
    assert run(sessions, settings, job_id, chunks[1], decodes).succeeded == 4
    assert shared == [settings.decode_threads]  # alone again: the process's pool
