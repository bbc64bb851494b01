"""Dynamic batching across jobs: many small chunks, one forward pass.

A worker running several tasks at once (Celery's threads pool) gives each task's decoded images
to one :class:`DynamicBatcher`. Its thread waits until ``max_batch`` images are queued or the
oldest request has waited ``max_delay_ms`` (Triton's policy), runs one forward pass over all of
them, and hands every task exactly its own rows back. Each task still writes its own results,
so per-job idempotency, acknowledgement and crash safety are unchanged; requests pinned to
different model versions never share a pass, and a hot reload lands between passes.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from dataclasses import field

import numpy as np
from PIL import Image

from face_emotions.ops import inference_metrics as metrics
from face_emotions.serving.model_holder import ServingModel

log = logging.getLogger(__name__)

ModelFor = Callable[[int | None], ServingModel]


@dataclass
class _Request:
    images: Sequence[Image.Image]
    pinned: int | None
    future: Future = field(default_factory=Future)
    arrived: float = field(default_factory=time.monotonic)


@dataclass(frozen=True)
class BatchedPrediction:
    probabilities: np.ndarray
    version: int
    forward_batch: int  # images in the shared forward pass


class DynamicBatcher:
    def __init__(self, model_for: ModelFor, *, max_batch: int, max_delay_ms: float) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        self._model_for = model_for
        self.max_batch = max_batch
        self.max_delay = max(0.0, max_delay_ms) / 1000.0
        self._queue: queue.Queue[_Request] = queue.Queue()
        self._carry: list[_Request] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dynamic-batcher", daemon=True)
        self._thread.start()

    def predict(
        self, images: Sequence[Image.Image], pinned: int | None = None
    ) -> BatchedPrediction:
        """Block until this request's rows of a shared forward pass are ready."""
        if not images:
            raise ValueError("nothing to predict")
        request = _Request(images, pinned)
        self._queue.put(request)
        return request.future.result()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)

    # -- batcher thread ------------------------------------------------------------------

    def _next(self, timeout: float) -> _Request | None:
        """The next request, waiting up to ``timeout`` seconds (not at all when <= 0)."""
        if self._carry:
            return self._carry.pop(0)
        try:
            if timeout <= 0:
                return self._queue.get_nowait()
            return self._queue.get(timeout=timeout)
        except queue.Empty:
            return None

    def _loop(self) -> None:
        while not self._stop.is_set():
            first = self._next(timeout=0.2)
            if first is None:
                continue
            group = [first]
            size = len(first.images)
            deadline = first.arrived + self.max_delay
            while size < self.max_batch:
                # Past the deadline, what is already queued still joins (a backlog is drained
                # in full batches); only waiting for more stops.
                candidate = self._next(timeout=deadline - time.monotonic())
                if candidate is None:
                    break
                if candidate.pinned != first.pinned or size + len(candidate.images) > max(
                    self.max_batch, len(first.images)
                ):
                    # Different model, or it would overflow the batch: it starts the next one.
                    self._carry.append(candidate)
                    break
                group.append(candidate)
                size += len(candidate.images)
            self._run(group, size)

    def _run(self, group: list[_Request], size: int) -> None:
        try:
            model = self._model_for(group[0].pinned)
            images = [image for request in group for image in request.images]
            started = time.perf_counter()
            probabilities = model.predictor.predict_images(images)
        except BaseException as exc:
            for request in group:
                request.future.set_exception(exc)
            return
        metrics.observe_forward(time.perf_counter() - started, len(images))
        start = 0
        for request in group:
            end = start + len(request.images)
            request.future.set_result(
                BatchedPrediction(probabilities[start:end], model.version, size)
            )
            start = end
