"""Tests for near-duplicate grouping and leak-free stratified splitting."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import imagehash
import numpy as np
import pytest
from PIL import Image

from face_emotions.data import near_duplicates
from face_emotions.data import perceptual_hashing
from face_emotions.data.near_duplicates import near_duplicate_groups
from face_emotions.data.perceptual_hashing import perceptual_hash
from face_emotions.data.perceptual_hashing import perceptual_hashes
from face_emotions.data.splits import DEFAULT_FRACTIONS
from face_emotions.data.splits import SPLITS
from face_emotions.data.splits import SplitSummary
from face_emotions.data.splits import stratified_group_split
from face_emotions.data.splits import summarise_split

# ------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------


def smooth_noise(seed: int, size: int = 128) -> Image.Image:
    """A random smooth RGB pattern: different seeds give clearly different pHashes."""
    rng = np.random.default_rng(seed)
    coarse = (rng.random((8, 8, 3)) * 255).astype(np.uint8)
    return Image.fromarray(coarse, "RGB").resize((size, size), Image.Resampling.BICUBIC)


def save(image: Image.Image, path: Path, **kwargs: object) -> Path:
    image.save(path, **kwargs)
    return path


def hamming(a: int, b: int) -> int:
    return bin(a ^ b).count("1")


def flip_bits(rng: np.random.Generator, values: np.ndarray, max_bits: int) -> np.ndarray:
    """Copy of ``values`` with 1..max_bits distinct random bits flipped in each entry."""
    out = values.copy()
    for i in range(out.size):
        n_bits = int(rng.integers(1, max_bits + 1))
        positions = rng.choice(64, size=n_bits, replace=False)
        mask = 0
        for p in positions:
            mask |= 1 << int(p)
        out[i] = np.uint64(int(out[i]) ^ mask)
    return out


def random_hashes(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.integers(0, np.iinfo(np.uint64).max, size=n, dtype=np.uint64, endpoint=True)


def brute_force_groups(hashes: np.ndarray, max_distance: int) -> np.ndarray:
    """O(n^2) reference: popcount via unpackbits, union-find in plain Python."""
    n = hashes.size
    bits = np.unpackbits(hashes.astype(">u8").view(np.uint8).reshape(n, 8), axis=1)
    parent = list(range(n))

    def find(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for i in range(n):
        dist = (bits[i] != bits[i + 1 :]).sum(axis=1)
        for j in np.flatnonzero(dist <= max_distance) + i + 1:
            ri, rj = find(i), find(int(j))
            if ri != rj:
                parent[max(ri, rj)] = min(ri, rj)
    roots = [find(i) for i in range(n)]
    first: dict[int, int] = {}
    return np.array([first.setdefault(r, len(first)) for r in roots], dtype=np.int64)


def make_grouped_items(
    rng: np.random.Generator, n_items: int, label_probs: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """Labels and group ids for ``n_items`` items in groups of 1-4 sharing one label."""
    labels: list[int] = []
    groups: list[int] = []
    group = 0
    while len(labels) < n_items:
        size = min(int(rng.integers(1, 5)), n_items - len(labels))
        label = int(rng.choice(len(label_probs), p=label_probs))
        labels += [label] * size
        groups += [group] * size
        group += 1
    perm = rng.permutation(n_items)  # members of a group need not be adjacent
    return np.array(labels)[perm], np.array(groups)[perm] * 7 + 3  # arbitrary, non-dense ids


def assert_no_straddling(groups: np.ndarray, assignment: np.ndarray) -> None:
    for g in np.unique(groups):
        assert len(set(assignment[groups == g])) == 1, f"group {g} straddles splits"


def assert_fractions_per_class(
    labels: np.ndarray, assignment: np.ndarray, tolerance: float = 0.02
) -> None:
    for label in np.unique(labels):
        in_class = assignment[labels == label]
        for split, target in zip(SPLITS, DEFAULT_FRACTIONS, strict=True):
            share = float(np.mean(in_class == split))
            assert abs(share - target) <= tolerance, (label, split, share)


# ------------------------------------------------------------------------------------------
# hashing
# ------------------------------------------------------------------------------------------


def test_perceptual_hash_matches_imagehash(tmp_path: Path) -> None:
    path = save(smooth_noise(1), tmp_path / "a.png")
    value = perceptual_hash(path)
    assert isinstance(value, int)
    assert 0 <= value < 2**64
    with Image.open(path) as img:
        assert value == int(str(imagehash.phash(img.convert("RGB"))), 16)


def test_image_groups_exact_near_and_distinct(tmp_path: Path) -> None:
    base = smooth_noise(10)
    original = save(base, tmp_path / "original.png")
    copy = tmp_path / "copy.png"
    copy.write_bytes(original.read_bytes())
    w, h = base.size
    resized = base.resize((int(w * 0.9), int(h * 0.9)), Image.Resampling.BILINEAR)
    near = save(resized, tmp_path / "near.jpg", quality=70)
    others = [save(smooth_noise(100 + i), tmp_path / f"other{i}.png") for i in range(6)]

    paths = [original, copy, near, *others]
    hashes = perceptual_hashes(paths, workers=2)
    assert hashes.dtype == np.uint64
    assert hamming(int(hashes[0]), int(hashes[2])) <= 4

    groups = near_duplicate_groups(hashes)
    assert groups.dtype == np.int64
    assert groups[0] == groups[1] == groups[2]
    assert len(set(groups[3:].tolist()) | {int(groups[0])}) == len(others) + 1
    assert groups.tolist() == [0, 0, 0, 1, 2, 3, 4, 5, 6]  # ids in order of first appearance


def test_unreadable_images_get_unique_hashes(tmp_path: Path) -> None:
    bad1 = tmp_path / "bad1.jpg"
    bad1.write_bytes(b"not an image")
    bad2 = tmp_path / "bad2.jpg"
    bad2.write_bytes(b"not an image either")
    missing = tmp_path / "missing.png"
    good = save(smooth_noise(3), tmp_path / "good.png")
    hashes = perceptual_hashes([bad1, bad2, missing, good], workers=1)
    assert len(set(hashes.tolist())) == 4
    assert len(set(near_duplicate_groups(hashes).tolist())) == 4
    # Stable across runs, so the split of a dataset with broken files is reproducible.
    again = perceptual_hashes([bad1, bad2, missing, good], workers=2)
    np.testing.assert_array_equal(hashes, again)


class _CountingHash:
    """Wraps the real perceptual_hash and counts calls (thread-safe)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._lock = threading.Lock()
        self._real = perceptual_hashing.perceptual_hash

    def __call__(self, path: str | os.PathLike[str]) -> int:
        with self._lock:
            self.calls.append(os.fspath(path))
        return self._real(path)


def test_cache_hit_and_invalidation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = [save(smooth_noise(i), tmp_path / f"img{i}.png") for i in range(5)]
    cache = tmp_path / "cache" / "phash.json"
    counter = _CountingHash()
    monkeypatch.setattr(perceptual_hashing, "perceptual_hash", counter)

    first = perceptual_hashes(paths, cache_file=cache, workers=2)
    assert len(counter.calls) == 5
    assert cache.is_file()
    assert len(json.loads(cache.read_text())["entries"]) == 5

    counter.calls.clear()
    second = perceptual_hashes(paths, cache_file=cache, workers=2, progress=True)
    assert counter.calls == []
    np.testing.assert_array_equal(first, second)

    # Change one file (new content, size and mtime): only that file is re-hashed.
    changed = paths[2]
    save(smooth_noise(999, size=96), changed)
    stat = changed.stat()
    os.utime(changed, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    counter.calls.clear()
    third = perceptual_hashes(paths, cache_file=cache, workers=2)
    assert counter.calls == [os.path.abspath(changed)]
    assert third[2] != first[2]
    np.testing.assert_array_equal(np.delete(third, 2), np.delete(first, 2))
    assert third[2] == perceptual_hash(changed)

    # A subset query is served from the same cache.
    counter.calls.clear()
    subset = perceptual_hashes(paths[:2], cache_file=cache)
    assert counter.calls == []
    np.testing.assert_array_equal(subset, first[:2])


def test_corrupt_cache_is_ignored(tmp_path: Path) -> None:
    paths = [save(smooth_noise(i), tmp_path / f"img{i}.png") for i in range(2)]
    cache = tmp_path / "phash.json"
    cache.write_text("{ truncated")
    hashes = perceptual_hashes(paths, cache_file=cache)
    assert hashes.tolist() == [perceptual_hash(p) for p in paths]
    assert json.loads(cache.read_text())["version"] == 1


# ------------------------------------------------------------------------------------------
# grouping
# ------------------------------------------------------------------------------------------


def test_groups_empty_and_trivial() -> None:
    assert near_duplicate_groups(np.zeros(0, dtype=np.uint64)).shape == (0,)
    assert near_duplicate_groups(np.array([5], dtype=np.uint64)).tolist() == [0]
    values = np.array([0, 1, 3, 0b111], dtype=np.uint64)
    assert near_duplicate_groups(values, max_distance=0).tolist() == [0, 1, 2, 3]
    assert near_duplicate_groups(values, max_distance=1).tolist() == [0, 0, 0, 0]
    assert near_duplicate_groups(values, max_distance=64).tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError):
        near_duplicate_groups(values, max_distance=-1)


def test_high_bits_and_chunk_boundaries() -> None:
    top = np.uint64(1 << 63)
    values = np.array(
        [top, top | np.uint64(1), np.uint64(0xFFFF_FFFF_FFFF_FFFF), 0], dtype=np.uint64
    )
    # top and top|1 differ by 1 bit; 0 is 1 bit from top; all-ones is far from everything.
    assert near_duplicate_groups(values, max_distance=1).tolist() == [0, 0, 1, 0]


def test_scaling_60k_with_planted_pairs() -> None:
    rng = np.random.default_rng(0)
    base = random_hashes(rng, 60_000)
    anchors = rng.choice(base.size, size=500, replace=False)
    planted = flip_bits(rng, base[anchors], max_bits=4)
    hashes = np.concatenate([base, planted])

    groups = near_duplicate_groups(hashes, max_distance=4)

    assert groups.shape == hashes.shape
    np.testing.assert_array_equal(groups[anchors], groups[base.size :])
    # Random 64-bit hashes are essentially never within 4 bits: only planted pairs merge.
    assert np.unique(groups).size == base.size


def test_many_identical_hashes_are_one_group() -> None:
    rng = np.random.default_rng(1)
    others = random_hashes(rng, 1_000)
    same = np.full(5_000, 0xDEADBEEF, dtype=np.uint64)
    hashes = np.concatenate([others[:500], same, others[500:]])
    groups = near_duplicate_groups(hashes)
    assert np.unique(groups[500:5500]).size == 1
    assert np.unique(groups).size == 1_001


@pytest.mark.parametrize("max_distance", [0, 2, 4, 6])
def test_matches_brute_force_reference(max_distance: int) -> None:
    rng = np.random.default_rng(42 + max_distance)
    base = random_hashes(rng, 1_200)
    # Neighbours of random base items, then neighbours of neighbours (chains a~b~c, where a and
    # c may be further apart than max_distance), plus exact copies and a shared-chunk cluster.
    level1 = flip_bits(rng, base[rng.choice(base.size, 400, replace=False)], max(max_distance, 1))
    level2 = flip_bits(rng, level1[rng.choice(level1.size, 200, replace=False)], max_distance + 1)
    copies = base[rng.choice(base.size, 100, replace=False)]
    low_bits_shared = (random_hashes(rng, 100) & np.uint64(0xFFFF_FFFF_0000_0000)) | np.uint64(7)
    hashes = np.concatenate([base, level1, level2, copies, low_bits_shared])
    hashes = hashes[rng.permutation(hashes.size)]
    assert hashes.size == 2_000

    expected = brute_force_groups(hashes, max_distance)
    actual = near_duplicate_groups(hashes, max_distance=max_distance)
    np.testing.assert_array_equal(actual, expected)
    assert np.unique(actual).size < hashes.size  # the test really exercised merging


def test_lookup_table_popcount_matches_native() -> None:
    rng = np.random.default_rng(5)
    values = random_hashes(rng, 1_000)
    table = np.array([bin(b).count("1") for b in range(256)])
    by_table = table[values.view(np.uint8)].reshape(-1, 8).sum(axis=1)
    np.testing.assert_array_equal(near_duplicates._popcount(values), by_table)


# ------------------------------------------------------------------------------------------
# splitting
# ------------------------------------------------------------------------------------------


def test_split_fractions_and_no_straddling() -> None:
    rng = np.random.default_rng(7)
    labels, groups = make_grouped_items(rng, 5_000, [0.25, 0.15, 0.3, 0.2, 0.1])

    assignment = stratified_group_split(labels, groups)

    assert assignment.shape == labels.shape
    assert set(assignment.tolist()) == set(SPLITS)
    assert_no_straddling(groups, assignment)
    assert_fractions_per_class(labels, assignment)


def test_split_is_deterministic_per_seed() -> None:
    rng = np.random.default_rng(8)
    labels, groups = make_grouped_items(rng, 2_000, [0.5, 0.3, 0.2])
    a = stratified_group_split(labels, groups, seed=281)
    b = stratified_group_split(list(labels), list(groups), seed=281)
    c = stratified_group_split(labels, groups, seed=282)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert_fractions_per_class(labels, c)


def test_split_imbalanced_labels_are_stratified() -> None:
    rng = np.random.default_rng(9)
    labels, groups = make_grouped_items(rng, 6_400, [2.2 / 3.2, 1.0 / 3.2])
    counts = np.bincount(labels)
    assert 2.0 < counts[0] / counts[1] < 2.4

    assignment = stratified_group_split(labels, groups)

    assert_no_straddling(groups, assignment)
    assert_fractions_per_class(labels, assignment)
    overall = counts[0] / counts[1]
    for split in SPLITS:
        per_split = np.bincount(labels[assignment == split], minlength=2)
        assert abs(per_split[0] / per_split[1] - overall) < 0.15 * overall, split


def test_tiny_classes_reach_every_split() -> None:
    # label 1: 3 singleton groups; label 2: 4 groups; label 0 dominates.
    labels = [0] * 300 + [1, 1, 1] + [2] * 6
    groups = [*range(300), 1000, 1001, 1002, 2000, 2000, 2001, 2002, 2003, 2003]
    assignment = stratified_group_split(labels, groups)
    lab = np.array(labels)
    assert set(assignment[lab == 1].tolist()) == set(SPLITS)
    assert set(assignment[lab == 2].tolist()) == set(SPLITS)
    assert_no_straddling(np.array(groups), assignment)


def test_split_uses_group_majority_label_and_validates() -> None:
    labels = [0, 0, 1, 2]
    groups = [5, 5, 5, 9]
    assignment = stratified_group_split(labels, groups)
    assert assignment[0] == assignment[1] == assignment[2]
    assert stratified_group_split([], []).shape == (0,)
    with pytest.raises(ValueError):
        stratified_group_split([0, 1], [0])
    with pytest.raises(ValueError):
        stratified_group_split([0, 1], [0, 1], fractions=(0.5, 0.5, 0.5))
    with pytest.raises(ValueError):
        stratified_group_split([0, 1], [0, 1], fractions=(1.2, -0.1, -0.1))


def test_zero_fraction_split_stays_empty() -> None:
    rng = np.random.default_rng(11)
    labels, groups = make_grouped_items(rng, 500, [0.6, 0.4])
    assignment = stratified_group_split(labels, groups, fractions=(0.8, 0.0, 0.2))
    assert "val" not in set(assignment.tolist())


def test_end_to_end_hash_group_split(tmp_path: Path) -> None:
    paths, labels = [], []
    for i in range(12):
        img = smooth_noise(500 + i)
        paths.append(save(img, tmp_path / f"{i}.png"))
        labels.append(i % 2)
        if i % 3 == 0:  # a near-duplicate of every third image
            small = img.resize((115, 115), Image.Resampling.BILINEAR)
            paths.append(save(small, tmp_path / f"{i}_dup.jpg", quality=70))
            labels.append(i % 2)
    groups = near_duplicate_groups(perceptual_hashes(paths))
    assignment = stratified_group_split(labels, groups)
    summary = summarise_split(labels, groups, assignment)
    assert summary.groups == 12
    assert summary.duplicate_images == 8
    assert_no_straddling(groups, assignment)


# ------------------------------------------------------------------------------------------
# summary
# ------------------------------------------------------------------------------------------


def test_summarise_split() -> None:
    labels = [0, 0, 1, 1, 1, 2]
    groups = [1, 1, 2, 3, 3, 4]
    assignment = ["train", "train", "val", "test", "test", "train"]
    summary = summarise_split(labels, groups, assignment)
    assert summary == SplitSummary(
        counts={
            "train": {0: 2, 1: 0, 2: 1},
            "val": {0: 0, 1: 1, 2: 0},
            "test": {0: 0, 1: 2, 2: 0},
        },
        groups=4,
        duplicate_images=4,
    )
    with pytest.raises(ValueError):
        summarise_split(labels, groups, ["train"] * 5 + ["holdout"])
    with pytest.raises(ValueError):
        summarise_split(labels, groups, ["train"])
