"""A chunk writes each micro-batch's results while the next runs through the model: in order,
at most one write in flight, every count accounted, and a failing chunk still waits for it."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from face_emotions.jobs.result_writes import ResultRow
from face_emotions.serving import chunk_classifier
from face_emotions.serving.chunk_classifier import _ResultWriter

JOB = uuid.uuid4()


@pytest.fixture
def writes(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, list[int], float, float, bool]]:
    """Each fake write records (thread, image ids, start, end, released) where ``released``
    says whether the caller had gone on before the write ended (it waits up to 10 s for
    :data:`GO_ON`, which the test sets once ``write()`` returned)."""
    log: list[tuple[str, list[int], float, float, bool]] = []

    def slow_write(_sessions, _job, rows, _version, _worker, _forward_batch, check_status):
        if any(row.image_id < 0 for row in rows):
            raise RuntimeError("database gone")
        start = time.monotonic()
        released = GO_ON.wait(10)
        GO_ON.clear()
        name = threading.current_thread().name
        log.append((name, [r.image_id for r in rows], start, time.monotonic(), released))
        return len(rows), 0, check_status

    GO_ON.clear()
    monkeypatch.setattr(chunk_classifier, "_write", slow_write)
    return log


GO_ON = threading.Event()


def _rows(*ids: int) -> list[ResultRow]:
    return [ResultRow(i, error="x") for i in ids]


def test_writes_run_beside_the_caller_in_order_and_are_all_accounted(writes) -> None:
    accounted: list[tuple[tuple[int, int], int | None]] = []

    def account(counts, version, _decode) -> None:
        accounted.append((counts, version))

    with _ResultWriter(None, JOB, "w", account) as writer:
        for first in (1, 3, 5):
            writer.write(_rows(first, first + 1), 7, 2, 0.0)
            GO_ON.set()  # the write in flight ends only now: write() did not wait for it
    assert [ids for _, ids, *_ in writes] == [[1, 2], [3, 4], [5, 6]]
    assert all(name.startswith("result-writer") for name, *_ in writes)
    assert all(released for *_, released in writes)
    # One write at a time: each starts after the previous one ended.
    assert writes[1][2] >= writes[0][3] and writes[2][2] >= writes[1][3]
    assert accounted == [((2, 0), 7)] * 3


def test_a_failing_chunk_waits_for_the_write_in_flight(writes) -> None:
    with (
        pytest.raises(ValueError, match="forward failed"),
        _ResultWriter(None, JOB, "w", lambda *_: None) as writer,
    ):
        writer.write(_rows(1), None, 1, 0.0)
        GO_ON.set()
        raise ValueError("forward failed")
    assert [ids for _, ids, *_ in writes] == [[1]]  # finished before the block was left


def test_a_failed_write_fails_the_chunk(writes) -> None:
    with (
        pytest.raises(RuntimeError, match="database gone"),
        _ResultWriter(None, JOB, "w", lambda *_: None) as writer,
    ):
        writer.write(_rows(-1), None, 1, 0.0)
        writer.write(_rows(2), None, 1, 0.0)  # learns of the failed one here
    assert writes == []
