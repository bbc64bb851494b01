"""Micro-batches of decoded images, decoded (and searched for faces) ahead of the consumer.

While the caller runs the forward pass of batch k, the pool already decodes batch k+1 and a
thread of its own detects the faces of the whole batch in one batched call (MTCNN runs images
of one size together): Pillow and torch release the GIL, so decoding, detection and inference
overlap instead of adding.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from concurrent.futures import Future
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Generic
from typing import TypeVar

from PIL import Image

from face_emotions.data.images import DEFAULT_MAX_PIXELS
from face_emotions.data.images import ImageDecodeError
from face_emotions.data.images import decode_image
from face_emotions.faces.detection import Face

K = TypeVar("K")
#: What a loader is given: a local path, or whatever locations its caller passes (``str``).
P = TypeVar("P", bound="str | Path")


@dataclass
class DecodedBatch(Generic[K]):
    """Decoded images of one micro-batch; ``keys`` line up with ``images``."""

    keys: list[K] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    errors: list[tuple[K, str]] = field(default_factory=list)
    #: Faces of each image, largest first (None: detection did not run for this batch).
    faces: list[list[Face] | None] = field(default_factory=list)
    #: Seconds spent decoding this batch's files, summed over the decode threads.
    decode_seconds: float = 0.0
    #: Seconds the batched face detection of this batch took (its own thread).
    detect_seconds: float = 0.0

    @property
    def paths(self) -> list[K]:
        return self.keys


def _decode_one(path: str | Path, max_pixels: int) -> Image.Image | str:
    try:
        return decode_image(path, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return exc.reason


def _timed(
    load: Callable[[P, int], Image.Image | str], path: P, max_pixels: int
) -> tuple[Image.Image | str, float]:
    started = time.perf_counter()
    result = load(path, max_pixels)
    return result, time.perf_counter() - started


DetectMany = Callable[[list[Image.Image]], list[list[Face]]]


def _detected(
    decodes: list[Future], detect_many: DetectMany
) -> tuple[list[list[Face] | str | None], float]:
    """Faces of one micro-batch's decoded images, in one batched detector call.

    Runs on its own thread ahead of the consumer, as decoding does. An image the detector
    fails on is found by detecting the batch's images one by one, and gets the failure as
    its error; the others keep their faces.
    """
    images = [future.result()[0] for future in decodes]
    decoded = [i for i, image in enumerate(images) if not isinstance(image, str)]
    found: list[list[Face] | str | None] = [None] * len(images)
    started = time.perf_counter()
    try:
        for i, faces in zip(decoded, detect_many([images[i] for i in decoded]), strict=True):
            found[i] = faces
    except Exception:
        for i in decoded:
            try:
                found[i] = detect_many([images[i]])[0]
            except Exception as exc:  # that image's error, not the batch's
                found[i] = f"face detection failed: {type(exc).__name__}: {exc}"
    return found, time.perf_counter() - started


class PendingBatch(Generic[K]):
    """One micro-batch whose decoding (and face detection) was submitted and may still run.

    ``keys`` and ``paths`` say what it holds, so that a caller handed one it did not submit
    (the chunk classifier's look-ahead) can check it is the batch it wants before using it.
    """

    def __init__(
        self,
        keys: Sequence[K],
        paths: Sequence[str | Path],
        decodes: list[Future],
        detection: Future | None,
    ) -> None:
        self.keys = list(keys)
        self.paths = list(paths)
        self._decodes = decodes
        self._detection = detection

    def cancel(self) -> None:
        """Drop the decodes that have not started (a look-ahead nobody will use)."""
        for future in self._decodes:
            future.cancel()
        if self._detection is not None:
            self._detection.cancel()

    def result(self) -> DecodedBatch[K]:
        """Wait for the decodes; unreadable files and failed detections land in ``errors``."""
        batch: DecodedBatch[K] = DecodedBatch()
        found: list[list[Face] | str | None] = [None] * len(self.keys)
        if self._detection is not None:
            found, batch.detect_seconds = self._detection.result()
        for key, future, faces in zip(self.keys, self._decodes, found, strict=True):
            result, seconds = future.result()
            batch.decode_seconds += seconds
            if isinstance(result, str) or isinstance(faces, str):
                batch.errors.append((key, faces if isinstance(faces, str) else result))
            else:
                batch.keys.append(key)
                batch.images.append(result)
                batch.faces.append(faces)
        return batch


class DecodePool:
    """The threads that decode micro-batches (``workers`` of them) and detect their faces (one).

    ``iter_decoded_batches`` makes one per call by default. A worker keeps one for its
    process instead: starting and joining the threads cost about 14 ms per chunk on a 2-core
    machine, with the model idle, and a pool that outlives the chunk can start decoding the
    next chunk's first micro-batch while the last one runs through the model.
    """

    def __init__(self, workers: int = 2) -> None:
        self.workers = max(1, workers)
        self._decode = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="decode")
        self._detect = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detect")

    def submit(
        self,
        paths: Sequence[P],
        keys: Sequence[K],
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        loader: Callable[[P, int], Image.Image | str] | None = None,
        detect_many: DetectMany | None = None,
    ) -> PendingBatch[K]:
        """Start decoding one micro-batch (``keys`` line up with ``paths``)."""
        load = loader or _decode_one
        decodes = [self._decode.submit(_timed, load, path, max_pixels) for path in paths]
        detection = self._detect.submit(_detected, decodes, detect_many) if detect_many else None
        return PendingBatch(keys, paths, decodes, detection)

    def shutdown(self) -> None:
        self._decode.shutdown(wait=True, cancel_futures=True)
        self._detect.shutdown(wait=True, cancel_futures=True)


def iter_decoded_batches(
    paths: Sequence[P],
    batch_size: int,
    *,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prefetch: int = 1,
    loader: Callable[[P, int], Image.Image | str] | None = None,
    keys: Sequence[K] | None = None,
    detect_many: DetectMany | None = None,
    pool: DecodePool | None = None,
    first: PendingBatch | None = None,
) -> Iterator[DecodedBatch]:
    """Yield batches in order; unreadable files land in ``errors`` with the reason.

    ``loader`` replaces local decoding (e.g. reading from object storage); ``keys`` lets callers
    carry their own identifiers (database ids) instead of paths; ``detect_many`` finds the
    faces of each decoded micro-batch (``faces`` of the batch) in one batched call on a thread
    of its own, while the consumer runs the forward pass of the batch before.

    ``pool`` runs the decoding on threads that outlive the call (``workers`` then only sizes a
    pool made for this call). ``first`` is the first micro-batch, already submitted to that
    pool; the caller has checked it holds the first ``batch_size`` keys and paths.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    key_list: Sequence = keys if keys is not None else paths
    chunks = [range(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)]
    owned = pool is None
    decoder = pool if pool is not None else DecodePool(workers)
    try:
        pending: deque[PendingBatch] = deque()

        def submit(chunk: range) -> None:
            pending.append(
                decoder.submit(
                    [paths[i] for i in chunk],
                    [key_list[i] for i in chunk],
                    max_pixels=max_pixels,
                    loader=loader,
                    detect_many=detect_many,
                )
            )

        upcoming = iter(chunks)
        if first is not None and chunks:
            next(upcoming)
            pending.append(first)
        while len(pending) <= prefetch and (chunk := next(upcoming, None)) is not None:
            submit(chunk)
        while pending:
            batch = pending.popleft()
            next_chunk = next(upcoming, None)
            if next_chunk is not None:
                submit(next_chunk)
            yield batch.result()
    finally:
        if owned:
            decoder.shutdown()
        else:  # a consumer that stopped early: what it will not read need not be decoded
            for batch in pending:
                batch.cancel()
