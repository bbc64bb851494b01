"""Leak-free train/val/test splits for a face-emotion dataset that contains near-duplicates.

Why this module exists: datasets such as Kaggle's *Human Face Emotions* (59,099 images) contain
the same photo several times (re-encoded, resized, lightly cropped). A plain random split puts
copies of one photo into both train and test, so test accuracy measures memorisation rather than
generalisation. We therefore

1. hash every image with a 64-bit perceptual hash
   (:func:`face_emotions.data.perceptual_hashing.perceptual_hashes`, cached on disk),
2. join images whose hashes are within a small Hamming distance into groups
   (:func:`face_emotions.data.near_duplicates.near_duplicate_groups`), and
3. split at group level, stratified by label (:func:`stratified_group_split`, here), so that no
   group straddles two splits while every class still gets roughly 64/16/20 of its images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SPLITS: tuple[str, str, str] = ("train", "val", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.64, 0.16, 0.20)
DEFAULT_SEED = 281


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
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
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
    labels: Sequence[int] | np.ndarray,
    groups: Sequence[int] | np.ndarray,
    assignment: Sequence[str] | np.ndarray,
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
