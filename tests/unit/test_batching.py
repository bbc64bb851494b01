"""Micro-batches of decoded images: order, sizes, per-file errors, custom keys and loaders."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from face_emotions.serving.decode_ahead import DecodedBatch
from face_emotions.serving.decode_ahead import iter_decoded_batches

# 9 inputs: good images with distinct colours, and three kinds of bad file at known places.
LAYOUT = ["good", "good", "corrupt", "good", "empty", "good", "good", "missing", "good"]


@pytest.fixture
def files(tmp_path: Path) -> list[Path]:
    paths = []
    for i, kind in enumerate(LAYOUT):
        path = tmp_path / f"{i}.png"
        if kind == "good":
            Image.new("RGB", (8 + i, 6), (i * 20, 255 - i * 20, 7)).save(path)
        elif kind == "corrupt":
            path.write_bytes(b"this is not a PNG at all")
        elif kind == "empty":
            path.write_bytes(b"")
        paths.append(path)  # "missing" is never written
    return paths


def _colour(image: Image.Image) -> tuple[int, int, int]:
    return image.getpixel((0, 0))


def test_order_sizes_and_errors(files: list[Path]) -> None:
    batches = list(iter_decoded_batches(files, 4))
    assert all(isinstance(b, DecodedBatch) for b in batches)
    # Every input is accounted for exactly once, in batches of at most 4.
    assert [len(b.keys) + len(b.errors) for b in batches] == [4, 4, 1]
    keys = [k for b in batches for k in b.keys]
    assert keys == [p for p, kind in zip(files, LAYOUT, strict=True) if kind == "good"]
    for batch in batches:
        assert len(batch.images) == len(batch.keys)
        assert batch.paths == batch.keys
        for key, image in zip(batch.keys, batch.images, strict=True):
            i = int(Path(key).stem)
            assert image.mode == "RGB"
            assert image.size == (8 + i, 6)
            assert _colour(image) == (i * 20, 255 - i * 20, 7)

    errors = dict(e for b in batches for e in b.errors)
    assert list(errors) == [files[2], files[4], files[7]]
    assert "not an image" in errors[files[2]]
    assert errors[files[4]] == "empty file"
    assert errors[files[7]] == "file not found"
    # Errors stay in the batch their file belongs to.
    assert [files[2]] == [k for k, _ in batches[0].errors]
    assert [files[4], files[7]] == [k for k, _ in batches[1].errors]


@pytest.mark.parametrize(("batch_size", "sizes"), [(1, [1] * 9), (3, [3, 3, 3]), (100, [9])])
def test_batch_sizes(files: list[Path], batch_size: int, sizes: list[int]) -> None:
    batches = list(iter_decoded_batches(files, batch_size, workers=1, prefetch=0))
    assert [len(b.keys) + len(b.errors) for b in batches] == sizes


@pytest.mark.parametrize("prefetch", [0, 1, 5])
def test_prefetch_does_not_change_the_result(files: list[Path], prefetch: int) -> None:
    batches = list(iter_decoded_batches(files, 2, prefetch=prefetch, workers=3))
    assert [str(k) for b in batches for k in b.keys] == [
        str(p) for p, kind in zip(files, LAYOUT, strict=True) if kind == "good"
    ]


def test_keys_replace_paths(files: list[Path]) -> None:
    ids = [100 + i for i in range(len(files))]
    batches = list(iter_decoded_batches(files, 5, keys=ids))
    assert [k for b in batches for k in b.keys] == [
        100 + i for i, kind in enumerate(LAYOUT) if kind == "good"
    ]
    assert [k for b in batches for k, _ in b.errors] == [102, 104, 107]
    first = batches[0]
    assert _colour(first.images[first.keys.index(103)]) == (60, 195, 7)


def test_custom_loader(tmp_path: Path) -> None:
    seen: list[tuple[str, int]] = []

    def loader(path: str | Path, max_pixels: int) -> Image.Image | str:
        seen.append((str(path), max_pixels))
        if str(path).startswith("bad"):
            return "refused by loader"
        return Image.new("RGB", (2, 2), (len(str(path)), 0, 0))

    names = ["a", "bad1", "ccc"]
    batches = list(iter_decoded_batches(names, 2, loader=loader, max_pixels=1234))
    assert sorted(seen) == sorted((n, 1234) for n in names)
    assert [b.keys for b in batches] == [["a"], ["ccc"]]
    assert batches[0].errors == [("bad1", "refused by loader")]
    assert _colour(batches[1].images[0]) == (3, 0, 0)


def test_max_pixels_is_applied(files: list[Path]) -> None:
    batches = list(iter_decoded_batches(files[:2], 2, max_pixels=10))
    assert batches[0].keys == []
    assert all("over the limit" in reason for _, reason in batches[0].errors)


def test_no_paths_no_batches() -> None:
    assert list(iter_decoded_batches([], 4)) == []


@pytest.mark.parametrize("batch_size", [0, -1])
def test_batch_size_must_be_positive(files: list[Path], batch_size: int) -> None:
    with pytest.raises(ValueError, match="batch_size must be positive"):
        list(iter_decoded_batches(files, batch_size))
