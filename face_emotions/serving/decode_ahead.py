"""Micro-batches of decoded images, decoded in a thread pool ahead of the consumer.

While the caller runs the forward pass of batch k, the pool already decodes batch k+1: Pillow
releases the GIL while decoding, so on two cores decode and inference overlap instead of adding.
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

K = TypeVar("K")
#: What a loader is given: a local path, or whatever locations its caller passes (``str``).
P = TypeVar("P", bound="str | Path")


@dataclass
class DecodedBatch(Generic[K]):
    """Decoded images of one micro-batch; ``keys`` line up with ``images``."""

    keys: list[K] = field(default_factory=list)
    images: list[Image.Image] = field(default_factory=list)
    errors: list[tuple[K, str]] = field(default_factory=list)
    #: Seconds spent decoding this batch's files, summed over the decode threads.
    decode_seconds: float = 0.0

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


def iter_decoded_batches(
    paths: Sequence[P],
    batch_size: int,
    *,
    workers: int = 2,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    prefetch: int = 1,
    loader: Callable[[P, int], Image.Image | str] | None = None,
    keys: Sequence[K] | None = None,
) -> Iterator[DecodedBatch]:
    """Yield batches in order; unreadable files land in ``errors`` with the reason.

    ``loader`` replaces local decoding (e.g. reading from object storage); ``keys`` lets callers
    carry their own identifiers (database ids) instead of paths.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    load = loader or _decode_one
    key_list: Sequence = keys if keys is not None else paths
    chunks = [range(i, min(i + batch_size, len(paths))) for i in range(0, len(paths), batch_size)]
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="decode") as pool:
        pending: deque[tuple[range, list[Future]]] = deque()

        def submit(chunk: range) -> None:
            pending.append(
                (chunk, [pool.submit(_timed, load, paths[i], max_pixels) for i in chunk])
            )

        upcoming = iter(chunks)
        for chunk in upcoming:
            submit(chunk)
            if len(pending) > prefetch:
                break
        while pending:
            chunk, futures = pending.popleft()
            next_chunk = next(upcoming, None)
            if next_chunk is not None:
                submit(next_chunk)
            batch: DecodedBatch = DecodedBatch()
            for i, future in zip(chunk, futures, strict=True):
                result, seconds = future.result()
                batch.decode_seconds += seconds
                if isinstance(result, str):
                    batch.errors.append((key_list[i], result))
                else:
                    batch.keys.append(key_list[i])
                    batch.images.append(result)
            yield batch
