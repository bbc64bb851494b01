"""Leak-free train/val/test splits for a face-emotion dataset that contains near-duplicates.

Why this module exists: datasets such as Kaggle's *Human Face Emotions* (59,099 images) contain
the same photo several times (re-encoded, resized, lightly cropped). A plain random split puts
copies of one photo into both train and test, so test accuracy measures memorisation rather than
generalisation. We therefore

1. hash every image with a 64-bit perceptual hash (:func:`perceptual_hashes`, cached on disk so
   re-running training does not re-decode ~60k images),
2. join images whose hashes are within a small Hamming distance into groups
   (:func:`near_duplicate_groups`, pigeonhole multi-index hashing plus union-find, so 60k hashes
   take well under a second instead of 1.8 billion pairwise comparisons), and
3. split at group level, stratified by label (:func:`stratified_group_split`), so that no group
   straddles two splits while every class still gets roughly 64/16/20 of its images.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image

from face_emotions.data.images import ImageDecodeError, decode_image

__all__ = [
    "DEFAULT_FRACTIONS",
    "DEFAULT_SEED",
    "SPLITS",
    "SplitSummary",
    "near_duplicate_groups",
    "perceptual_hash",
    "perceptual_hashes",
    "stratified_group_split",
    "summarise_split",
]

logger = logging.getLogger(__name__)

SPLITS: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.64, 0.16, 0.20)
DEFAULT_SEED = 281

_HASH_BITS = 64
_CACHE_FORMAT = "face_emotions.phash-cache"
_CACHE_VERSION = 1
# Errors that mean "this one file cannot be hashed"; anything else is a bug and should propagate.
_UNREADABLE_ERRORS: tuple[type[BaseException], ...] = (
    ImageDecodeError,
    OSError,
    ValueError,
    Image.DecompressionBombError,
)


# --------------------------------------------------------------------------------------------
# Perceptual hashing
# --------------------------------------------------------------------------------------------


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
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

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


# --------------------------------------------------------------------------------------------
# Near-duplicate grouping
# --------------------------------------------------------------------------------------------

if hasattr(np, "bitwise_count"):

    def _popcount(values: np.ndarray) -> np.ndarray:
        """Number of set bits per uint64 (numpy >= 2.0 has a native ufunc)."""
        return np.bitwise_count(values).astype(np.int64)

else:  # pragma: no cover - exercised only on numpy < 2.0
    _BYTE_POPCOUNT = np.array([bin(b).count("1") for b in range(256)], dtype=np.int64)

    def _popcount(values: np.ndarray) -> np.ndarray:
        """Number of set bits per uint64 via a byte lookup table."""
        as_bytes = np.ascontiguousarray(values, dtype=np.uint64).view(np.uint8)
        return _BYTE_POPCOUNT[as_bytes].reshape(-1, 8).sum(axis=1)


def _chunk_layout(n_chunks: int) -> list[tuple[int, int]]:
    """(shift, width) of ``n_chunks`` near-equal bit ranges covering all 64 bits."""
    base, extra = divmod(_HASH_BITS, n_chunks)
    layout, shift = [], 0
    for c in range(n_chunks):
        width = base + (1 if c < extra else 0)
        layout.append((shift, width))
        shift += width
    return layout


def _bucket_pairs(keys: np.ndarray) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield index pairs (i, j), i != j, of items sharing a key, in batches of bounded size.

    Items are sorted by key; the pass for offset ``k`` pairs each item with the one ``k``
    positions later in the same run. Only items whose run still has a partner that far away stay
    active, so total work is proportional to the number of pairs (not ``n * max_bucket``) and each
    batch holds at most ``n`` pairs.
    """
    order = np.argsort(keys, kind="stable")
    sorted_keys = keys[order]
    n = len(keys)
    if n < 2:
        return
    starts = np.flatnonzero(np.r_[True, sorted_keys[1:] != sorted_keys[:-1]])
    run_len = np.diff(np.r_[starts, n])
    remaining = np.repeat(starts + run_len, run_len) - np.arange(n)  # items left in run, incl. self
    active = np.flatnonzero(remaining > 1)
    offset = 1
    while active.size:
        yield order[active], order[active + offset]
        offset += 1
        active = active[remaining[active] > offset]


def _connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Vectorised union-find: root (= smallest member index) of every node's component.

    Each round hooks the larger of two different roots onto the smaller one (min over all edges
    touching it), then compresses paths by pointer jumping. Roots only ever decrease, so no cycles
    form; edges already inside one component are dropped, so rounds get cheaper.
    """
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while a.size:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        if not a.size:
            break
        hi, lo = np.maximum(ra, rb), np.minimum(ra, rb)
        order = np.lexsort((lo, hi))
        hi, lo = hi[order], lo[order]
        first = np.r_[True, hi[1:] != hi[:-1]]
        parent[hi[first]] = lo[first]
        while True:
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent


def _first_appearance_ids(labels: np.ndarray) -> np.ndarray:
    """Relabel arbitrary ids to 0..k-1 in order of first appearance (stable, readable ids)."""
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    rank = np.empty(first.size, dtype=np.int64)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return rank[inverse.ravel()]


def near_duplicate_groups(hashes: np.ndarray, *, max_distance: int = 4) -> np.ndarray:
    """Group ids (int64, 0..k-1 by first appearance) of hashes within ``max_distance`` bits.

    Groups are connected components of the graph "Hamming distance <= max_distance", so chains
    a~b~c end up in one group even when a and c are further apart: they are all versions of
    one photo as far as leakage is concerned.

    Method (pigeonhole multi-index hashing): split the 64 bits into ``max_distance + 1`` chunks;
    two hashes differing in at most ``max_distance`` bits agree exactly on at least one chunk.
    Bucketing by each chunk value therefore yields every true pair as a candidate, and candidates
    are verified with a vectorised popcount. Identical hashes are merged first via ``np.unique``
    (thousands of copies of one image would otherwise create millions of candidate pairs). This is
    efficient for small distances (the intended 0-8); large ones make the chunks narrow and the
    buckets big.
    """
    if max_distance < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
    values = np.asarray(hashes)
    if values.ndim != 1:
        raise ValueError(f"hashes must be 1-D, got shape {values.shape}")
    values = values.astype(np.uint64, copy=False)
    n = values.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    if max_distance >= _HASH_BITS:
        return np.zeros(n, dtype=np.int64)

    unique, inverse = np.unique(values, return_inverse=True)
    inverse = inverse.ravel()
    edges_a: list[np.ndarray] = []
    edges_b: list[np.ndarray] = []
    for shift, width in _chunk_layout(max_distance + 1):
        mask = np.uint64((1 << width) - 1)
        keys = (unique >> np.uint64(shift)) & mask
        for i, j in _bucket_pairs(keys):
            close = _popcount(unique[i] ^ unique[j]) <= max_distance
            if close.any():
                edges_a.append(i[close])
                edges_b.append(j[close])

    if edges_a:
        roots = _connected_components(unique.size, np.concatenate(edges_a), np.concatenate(edges_b))
    else:
        roots = np.arange(unique.size, dtype=np.int64)
    return _first_appearance_ids(roots[inverse])


# --------------------------------------------------------------------------------------------
# Stratified group split
# --------------------------------------------------------------------------------------------


def _validate_fractions(fractions: tuple[float, float, float]) -> np.ndarray:
    """Fractions as an array; they must be three non-negative numbers summing to 1."""
    frac = np.asarray(fractions, dtype=np.float64)
    if frac.shape != (len(SPLITS),) or (frac < 0).any() or not np.isclose(frac.sum(), 1.0):
        raise ValueError(f"fractions must be {len(SPLITS)} non-negative numbers summing to 1")
    return frac


def _group_majority(
    label_idx: np.ndarray, group_idx: np.ndarray, n_groups: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per group: its most frequent label index (ties -> smallest label) and its size."""
    n_labels = int(label_idx.max()) + 1
    pair = group_idx.astype(np.int64) * n_labels + label_idx
    pair_values, pair_counts = np.unique(pair, return_counts=True)
    pair_group, pair_label = np.divmod(pair_values, n_labels)
    order = np.lexsort((pair_label, -pair_counts, pair_group))
    first = np.r_[True, pair_group[order][1:] != pair_group[order][:-1]]
    majority = np.empty(n_groups, dtype=np.int64)
    majority[pair_group[order][first]] = pair_label[order][first]
    sizes = np.bincount(group_idx, minlength=n_groups)
    return majority, sizes


def _assign_class(
    group_ids: np.ndarray, sizes: np.ndarray, frac: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Split index per group of one class, tracking the target image fractions greedily."""
    order = rng.permutation(group_ids.size)
    shuffled_sizes = sizes[order]
    target = frac * shuffled_sizes.sum()
    filled = np.zeros(len(SPLITS), dtype=np.float64)
    chosen = np.full(group_ids.size, -1, dtype=np.int64)

    # Every split with a non-zero fraction gets one group first when there are enough groups:
    # otherwise a class of 3 images could land entirely in train and vanish from val/test
    # metrics. The smallest groups are used (smallest for the smallest target) to disturb the
    # fractions least.
    wanted = [s for s in np.argsort(frac, kind="stable") if frac[s] > 0]
    if group_ids.size >= len(wanted):
        seeds = np.argsort(shuffled_sizes, kind="stable")[: len(wanted)]
        for pos, split in zip(seeds, wanted, strict=True):
            chosen[pos] = split
            filled[split] += shuffled_sizes[pos]

    for pos in range(group_ids.size):
        if chosen[pos] >= 0:
            continue
        split = int(np.argmax(target - filled))  # largest remaining deficit; ties -> SPLITS order
        chosen[pos] = split
        filled[split] += shuffled_sizes[pos]

    result = np.empty(group_ids.size, dtype=np.int64)
    result[order] = chosen
    return result


def stratified_group_split(
    labels: Sequence[int],
    groups: Sequence[int],
    *,
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS,
    seed: int = DEFAULT_SEED,
) -> np.ndarray:
    """Assign each item to ``"train"``/``"val"``/``"test"`` keeping whole groups together.

    Each group takes its majority label (ties -> smallest label). Per label, groups are shuffled
    with ``numpy.random.default_rng(seed)`` and assigned one by one to the split with the largest
    remaining image deficit against ``fractions``, so every class is split close to the targets
    even though groups have different sizes. A class with at least three groups gets at least one
    group in each split. The result is deterministic for a given seed and input order.
    """
    label_arr = np.asarray(labels)
    group_arr = np.asarray(groups)
    if label_arr.ndim != 1 or label_arr.shape != group_arr.shape:
        raise ValueError("labels and groups must be 1-D sequences of equal length")
    frac = _validate_fractions(fractions)
    split_names = np.array(SPLITS)
    if label_arr.size == 0:
        return split_names[np.zeros(0, dtype=np.int64)]

    _, label_idx = np.unique(label_arr, return_inverse=True)
    _, group_idx = np.unique(group_arr, return_inverse=True)
    label_idx, group_idx = label_idx.ravel(), group_idx.ravel()
    n_groups = int(group_idx.max()) + 1
    majority, sizes = _group_majority(label_idx, group_idx, n_groups)

    rng = np.random.default_rng(seed)
    group_split = np.empty(n_groups, dtype=np.int64)
    for label in range(int(label_idx.max()) + 1):
        members = np.flatnonzero(majority == label)
        if members.size:
            group_split[members] = _assign_class(members, sizes[members], frac, rng)
    return split_names[group_split[group_idx]]


# --------------------------------------------------------------------------------------------
# Summary
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SplitSummary:
    """What a split looks like, for logging and for checking that it is sane.

    Attributes:
        counts: split name -> label -> number of images (every label listed in every split).
        groups: number of near-duplicate groups.
        duplicate_images: images belonging to a group of size > 1, i.e. images a random split
            could have leaked.
    """

    counts: dict[str, dict[int, int]]
    groups: int
    duplicate_images: int


def summarise_split(
    labels: Sequence[int], groups: Sequence[int], assignment: Sequence[str]
) -> SplitSummary:
    """Count images per split and label, plus group statistics, for a split assignment."""
    label_arr = np.asarray(labels)
    group_arr = np.asarray(groups)
    split_arr = np.asarray(assignment)
    if not label_arr.shape == group_arr.shape == split_arr.shape or label_arr.ndim != 1:
        raise ValueError("labels, groups and assignment must be 1-D sequences of equal length")
    unknown = set(np.unique(split_arr).tolist()) - set(SPLITS)
    if unknown:
        raise ValueError(f"unknown split names: {sorted(unknown)}")

    all_labels = sorted(int(v) for v in np.unique(label_arr))
    counts: dict[str, dict[int, int]] = {}
    for split in SPLITS:
        values, n = np.unique(label_arr[split_arr == split], return_counts=True)
        per_label = dict.fromkeys(all_labels, 0)
        per_label.update({int(v): int(c) for v, c in zip(values, n, strict=True)})
        counts[split] = per_label

    _, group_sizes = np.unique(group_arr, return_counts=True)
    return SplitSummary(
        counts=counts,
        groups=int(group_sizes.size),
        duplicate_images=int(group_sizes[group_sizes > 1].sum()),
    )
