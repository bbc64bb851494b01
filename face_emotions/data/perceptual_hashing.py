"""64-bit perceptual hashes of a folder of images, cached on disk.

Grouping near-duplicates needs a hash of every image; decoding ~60k images takes minutes, so
hashes are cached by path, size and modification time, and a re-run of training only hashes
files that are new or changed. Files that can't be decoded get a hash of their bytes instead:
they still land in a group (of identical files) and the split never crashes on one bad image.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from face_emotions.data.images import ImageDecodeError
from face_emotions.data.images import decode_image

logger = logging.getLogger(__name__)

HASH_BITS = 64
_CACHE_FORMAT = "face_emotions.phash-cache"
_CACHE_VERSION = 1


# Errors that mean "this one file cannot be hashed"; anything else is a bug and should propagate.
_UNREADABLE_ERRORS: tuple[type[BaseException], ...] = (
    ImageDecodeError,
    OSError,
    ValueError,
    Image.DecompressionBombError,
)


def perceptual_hash(path: str | os.PathLike[str]) -> int:
    """Return the 64-bit pHash of the image at ``path`` as an unsigned int.

    The image is opened through :func:`face_emotions.data.images.decode_image` so that hashing
    sees exactly the pixels training sees (EXIF orientation, palette/alpha handling, size limits).
    The bit order matches ``int(str(imagehash.phash(img)), 16)``.

    Raises:
        ImageDecodeError: the file is not a decodable image.
    """
    image = decode_image(path)
    bits = imagehash.phash(image, hash_size=8).hash
    return int.from_bytes(np.packbits(bits.ravel()).tobytes(), "big")


def _fallback_hash(abs_path: str) -> int:
    """Hash for an unreadable file: derived from its path, so it is stable and (effectively) unique.

    A random 64-bit value lies within Hamming distance 4 of a given hash with probability ~4e-14,
    so such images end up in singleton groups instead of all colliding into one fake "duplicate"
    group, which a constant sentinel value would cause.
    """
    digest = hashlib.blake2b(abs_path.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def _safe_hash(path: str) -> int | None:
    """Hash one file, mapping "cannot read this image" to ``None`` (looked up at call time)."""
    try:
        return perceptual_hash(path)
    except _UNREADABLE_ERRORS as exc:
        logger.warning("cannot hash %s: %s", path, exc)
        return None


def _load_cache(cache_file: Path) -> dict[str, list[Any]]:
    """Read the cache; a missing, corrupt or foreign file just means "nothing cached"."""
    try:
        with cache_file.open(encoding="utf-8") as fh:
            payload = json.load(fh)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        logger.warning("ignoring unreadable pHash cache %s: %s", cache_file, exc)
        return {}
    if (
        not isinstance(payload, dict)
        or payload.get("format") != _CACHE_FORMAT
        or payload.get("version") != _CACHE_VERSION
        or not isinstance(payload.get("entries"), dict)
    ):
        logger.warning("ignoring pHash cache %s with unknown format", cache_file)
        return {}
    return payload["entries"]


def _save_cache(cache_file: Path, entries: dict[str, list[Any]]) -> None:
    """Write the cache atomically so an interrupted run never leaves a truncated file behind."""
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    payload = {"format": _CACHE_FORMAT, "version": _CACHE_VERSION, "entries": entries}
    fd, tmp_name = tempfile.mkstemp(
        prefix=cache_file.name + ".", suffix=".tmp", dir=cache_file.parent
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(payload, fh, separators=(",", ":"))
        os.replace(tmp_name, cache_file)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def _hash_all(paths: Sequence[str], workers: int) -> Iterator[int | None]:
    """Yield hashes in input order; threads suffice because decoding and the DCT release the GIL."""
    if workers <= 1 or len(paths) <= 1:
        yield from map(_safe_hash, paths)
        return
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="phash")
    try:
        yield from pool.map(_safe_hash, paths)
    finally:
        # On Ctrl-C or an error, drop the queued files instead of hashing all 59k first.
        pool.shutdown(wait=True, cancel_futures=True)


def _with_progress(
    results: Iterable[int | None], total: int, enabled: bool
) -> Iterator[int | None]:
    """Wrap ``results`` in a rich progress bar when asked; rich is imported only then."""
    if not enabled:
        yield from results
        return
    from rich.progress import BarColumn
    from rich.progress import MofNCompleteColumn
    from rich.progress import Progress
    from rich.progress import TextColumn
    from rich.progress import TimeRemainingColumn

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("perceptual hashes", total=total)
        for result in results:
            yield result
            bar.advance(task)


def perceptual_hashes(
    paths: Sequence[Path],
    *,
    cache_file: Path | None = None,
    workers: int = 2,
    progress: bool = False,
    unreadable: list[int] | None = None,
) -> np.ndarray:
    """Return the pHash of every path as a ``uint64`` array (same order as ``paths``).

    Args:
        paths: image files (``str`` works too).
        cache_file: optional JSON cache keyed by (absolute path, size, mtime_ns). A file whose size
            or mtime changed is re-hashed; entries for paths not asked about are kept, so one cache
            can serve several subsets of a dataset.
        workers: threads used to decode/hash; ``<= 1`` hashes serially.
        progress: show a rich progress bar for the files that are actually hashed.
        unreadable: if given, the indices of files that could not be decoded are appended, so
            training can drop them instead of failing mid-epoch.

    Unreadable or missing files get a stable, effectively unique hash (so they form singleton
    groups) and are logged; they are not cached, so a fixed file is picked up on the next run.
    """
    abs_paths = [os.path.abspath(os.fspath(p)) for p in paths]
    result = np.zeros(len(abs_paths), dtype=np.uint64)
    entries = _load_cache(Path(cache_file)) if cache_file is not None else {}

    stamps: list[tuple[int, int] | None] = []
    todo: list[int] = []
    for i, path in enumerate(abs_paths):
        try:
            st = os.stat(path)
            stamp: tuple[int, int] | None = (st.st_size, st.st_mtime_ns)
        except OSError:
            stamp = None
        stamps.append(stamp)
        cached = entries.get(path)
        if (
            stamp is not None
            and isinstance(cached, list)
            and len(cached) == 3
            and (cached[0], cached[1]) == stamp
        ):
            try:
                result[i] = int(cached[2], 16)
                continue
            except (TypeError, ValueError):
                pass
        todo.append(i)

    failures = 0
    changed = False
    todo_paths = [abs_paths[i] for i in todo]
    hashed = _with_progress(_hash_all(todo_paths, workers), len(todo), progress)
    for i, value in zip(todo, hashed, strict=True):
        path, stamp = abs_paths[i], stamps[i]
        if value is None:
            failures += 1
            if unreadable is not None:
                unreadable.append(i)
            result[i] = _fallback_hash(path)
            if entries.pop(path, None) is not None:
                changed = True
            continue
        result[i] = value
        if stamp is not None:
            entries[path] = [stamp[0], stamp[1], f"{value:016x}"]
            changed = True

    if failures:
        logger.warning("%d of %d images could not be hashed", failures, len(abs_paths))
    if cache_file is not None and changed:
        _save_cache(Path(cache_file), entries)
    return result
