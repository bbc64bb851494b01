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
) -> Iterator[DecodedBatch]:
    """Yield batches in order; unreadable files land in ``errors`` with the reason.

    ``loader`` replaces local decoding (e.g. reading from object storage); ``keys`` lets callers
    carry their own identifiers (database ids) instead of paths; ``detect_many`` finds the
    faces of each decoded micro-batch (``faces`` of the batch) in one batched call on a thread
    of its own, while the consumer runs the forward pass of the batch before.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    load = loader or _decode_one
    key_list: Sequence = keys if keys is not None else paths
    chunks = [range(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)]
    with (
        ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="detect") as detector,
    ):
        pending: deque[tuple[range, list[Future], Future | None]] = deque()

        def submit(chunk: range) -> None:
            decodes = [pool.submit(_timed, load, paths[i], max_pixels) for i in chunk]
            detection = detector.submit(_detected, decodes, detect_many) if detect_many else None
            pending.append((chunk, decodes, detection))

        upcoming = iter(chunks)
        for chunk in upcoming:
            submit(chunk)
            if len(pending) > prefetch:
                break
        while pending:
            chunk, decodes, detection = pending.popleft()
            next_chunk = next(upcoming, None)
            if next_chunk is not None:
                submit(next_chunk)
            batch: DecodedBatch = DecodedBatch()
            found: list[list[Face] | str | None] = [None] * len(chunk)
            if detection is not None:
                found, batch.detect_seconds = detection.result()
            for i, future, faces in zip(chunk, decodes, found, strict=True):
                result, seconds = future.result()
                batch.decode_seconds += seconds
                if isinstance(result, str) or isinstance(faces, str):
                    batch.errors.append((key_list[i], faces if isinstance(faces, str) else result))
                else:
                    batch.keys.append(key_list[i])
                    batch.images.append(result)
                    batch.faces.append(faces)
            yield batch
