"""DynamicBatcher: one forward pass for many small requests, each gets exactly its own rows."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field

import numpy as np
import pytest
from PIL import Image

from face_emotions.serving.dynamic_batcher import DynamicBatcher


@dataclass
class FakePredictor:
    """Row i encodes the image's grey value, so a caller can check it got its own rows."""

    calls: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def predict_images(self, images):
        with self.lock:
            self.calls.append(len(images))
        values = np.array([image.getpixel((0, 0))[0] for image in images], dtype=np.float32)
        return np.stack([values, values + 0.5], axis=1)


@dataclass
class FakeModel:
    version: int
    predictor: FakePredictor


def image(value: int) -> Image.Image:
    return Image.new("RGB", (4, 4), (value, value, value))


def test_concurrent_requests_share_forward_passes_and_get_their_own_rows() -> None:
    predictor = FakePredictor()
    batcher = DynamicBatcher(lambda pinned: FakeModel(1, predictor), max_batch=32, max_delay_ms=200)
    requests = [[image(3 * i), image(3 * i + 1), image(3 * i + 2)] for i in range(20)]

    with ThreadPoolExecutor(20) as pool:
        results = list(pool.map(batcher.predict, requests))
    batcher.close()

    for i, result in enumerate(results):
        assert result.probabilities[:, 0].tolist() == [3 * i, 3 * i + 1, 3 * i + 2]
        assert result.version == 1
    assert sum(predictor.calls) == 60
    assert len(predictor.calls) < 20, "requests were not batched together"
    assert max(predictor.calls) <= 32


def test_pinned_versions_never_share_a_pass() -> None:
    models = {None: FakeModel(1, FakePredictor()), 7: FakeModel(7, FakePredictor())}
    batcher = DynamicBatcher(lambda pinned: models[pinned], max_batch=64, max_delay_ms=200)
    with ThreadPoolExecutor(10) as pool:
        futures = [
            pool.submit(batcher.predict, [image(i)], 7 if i % 2 else None) for i in range(10)
        ]
        results = [f.result() for f in futures]
    batcher.close()
    for i, result in enumerate(results):
        assert result.version == (7 if i % 2 else 1)
        assert result.probabilities[0, 0] == i
    assert sum(models[None].predictor.calls) == 5 and sum(models[7].predictor.calls) == 5


def test_a_lone_request_is_flushed_after_the_delay() -> None:
    predictor = FakePredictor()
    batcher = DynamicBatcher(
        lambda pinned: FakeModel(1, predictor), max_batch=1000, max_delay_ms=20
    )
    result = batcher.predict([image(9)])
    batcher.close()
    assert result.forward_batch == 1 and predictor.calls == [1]


def test_model_errors_reach_every_waiting_request() -> None:
    def broken(pinned):
        raise RuntimeError("no model")

    batcher = DynamicBatcher(broken, max_batch=8, max_delay_ms=50)
    with ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(batcher.predict, [image(i)]) for i in range(3)]
        for future in futures:
            with pytest.raises(RuntimeError, match="no model"):
                future.result()
    batcher.close()


def test_a_backlog_is_drained_in_full_batches_without_waiting_again() -> None:
    """Requests that queued up while a pass ran join the next pass even though they are
    already older than the delay (carried requests included)."""
    entered, release = threading.Event(), threading.Event()
    predictor = FakePredictor()

    class Gate:
        def predict_images(self, images):
            entered.set()
            assert release.wait(10), "the test never released the first pass"
            return predictor.predict_images(images)

    batcher = DynamicBatcher(lambda pinned: FakeModel(1, Gate()), max_batch=8, max_delay_ms=1)
    with ThreadPoolExecutor(25) as pool:
        first = pool.submit(batcher.predict, [image(0)])
        assert entered.wait(10), "the first request never reached the model"
        rest = [pool.submit(batcher.predict, [image(i)]) for i in range(1, 25)]
        deadline = time.monotonic() + 10
        while batcher._queue.qsize() < 24:  # the other 24 wait behind the blocked pass
            assert time.monotonic() < deadline, "requests did not queue up"
            time.sleep(0.01)
        release.set()
        results = [first.result(10)] + [future.result(10) for future in rest]
    batcher.close()
    assert [r.probabilities[0, 0] for r in results] == list(range(25))
    assert predictor.calls == [1, 8, 8, 8], predictor.calls


def test_a_worker_that_runs_one_task_at_a_time_is_told_it_has_nothing_to_batch(caplog) -> None:
    from worker.runtime import warn_if_nothing_to_batch

    with caplog.at_level("WARNING", logger="worker.runtime"):
        assert warn_if_nothing_to_batch()  # a prefork pool process runs tasks here
        with ThreadPoolExecutor(1) as pool:  # a threads-pool task does not
            assert not pool.submit(warn_if_nothing_to_batch).result()
    assert ["--pool threads" in r.getMessage() for r in caplog.records] == [True]
