"""Scanning a labelled folder: aliases merge, unknown folders are reported, never a 6th class."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from PIL import Image

from face_emotions.data.labelled_folder import DatasetError
from face_emotions.data.labelled_folder import LabelledImage
from face_emotions.data.labelled_folder import ScanResult
from face_emotions.data.labelled_folder import scan_labelled_folder
from face_emotions.labels import EMOTIONS

LAYOUT = {
    "Angry": ["a1.png", "a2.jpg"],
    "fear": ["f1.jpeg"],
    "HAPPY": ["h1.png", "h2.png", "h3.JPG"],
    "Sad": ["s1.png"],
    "Suprise": ["k1.jpg", "k2.png"],
    "Surprise": ["u1.png"],
    "Contempt": ["c1.png", "c2.png", "c3.png"],
}


def _write_image(path: Path, shade: int = 128) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "JPEG" if path.suffix.lower() in {".jpg", ".jpeg"} else "PNG"
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(path, fmt)


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    for folder, names in LAYOUT.items():
        for name in names:
            _write_image(root / folder / name)
    (root / "HAPPY" / "notes.txt").write_text("not an image")
    _write_image(root / "HAPPY" / ".hidden.png")
    _write_image(root / ".thumbnails" / "t.png")
    return root


def test_scan_maps_merges_and_skips(data_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="face_emotions.data.labelled_folder"):
        result = scan_labelled_folder(data_root)

    assert result.class_counts == {"Angry": 2, "Fear": 1, "Happy": 3, "Sad": 1, "Surprised": 3}
    assert list(result.class_counts) == list(EMOTIONS)
    assert result.unknown_folders == {"Contempt": 3}
    assert result.folder_map == {
        "Angry": "Angry",
        "HAPPY": "Happy",
        "Sad": "Sad",
        "Suprise": "Surprised",
        "Surprise": "Surprised",
        "fear": "Fear",
    }
    assert len(result.items) == 10
    assert {item.label for item in result.items} == set(range(len(EMOTIONS)))
    assert all(item.label < len(EMOTIONS) for item in result.items)
    assert not any("Contempt" in item.path.parts for item in result.items)
    assert not any(item.path.name.startswith(".") for item in result.items)

    by_name = {item.path.name: item.label for item in result.items}
    assert by_name["k1.jpg"] == by_name["u1.png"] == EMOTIONS.index("Surprised")
    assert by_name["f1.jpeg"] == EMOTIONS.index("Fear")
    assert by_name["h3.JPG"] == EMOTIONS.index("Happy")

    paths = [item.path for item in result.items]
    assert paths == sorted(paths, key=lambda p: p.parts)
    assert all(p.is_file() and p.is_relative_to(data_root) for p in paths)

    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("Contempt" in r.getMessage() and "3 images" in r.getMessage() for r in warnings)


def test_items_are_frozen_labelled_images(data_root: Path) -> None:
    item = scan_labelled_folder(data_root).items[0]
    assert isinstance(item, LabelledImage)
    with pytest.raises(AttributeError):
        item.label = 3  # type: ignore[misc]


def test_non_recursive_ignores_nested_folders(data_root: Path) -> None:
    _write_image(data_root / "Sad" / "nested" / "deep.png")
    assert scan_labelled_folder(data_root).class_counts["Sad"] == 2
    assert scan_labelled_folder(data_root, recursive=False).class_counts["Sad"] == 1


def test_missing_classes_are_zero_and_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_image(tmp_path / "joy" / "x.png")
    with caplog.at_level(logging.WARNING, logger="face_emotions.data.labelled_folder"):
        result = scan_labelled_folder(tmp_path)
    assert result.class_counts == {"Angry": 0, "Fear": 0, "Happy": 1, "Sad": 0, "Surprised": 0}
    assert result.unknown_folders == {}
    assert any("Angry" in r.getMessage() for r in caplog.records)


def test_loose_files_at_root_are_ignored_and_warned(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _write_image(tmp_path / "Sad" / "x.png")
    _write_image(tmp_path / "loose.png")
    with caplog.at_level(logging.WARNING, logger="face_emotions.data.labelled_folder"):
        result = scan_labelled_folder(tmp_path)
    assert [item.path.name for item in result.items] == ["x.png"]
    assert any("directly under" in r.getMessage() for r in caplog.records)


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_symlinked_class_folder_is_not_followed(tmp_path: Path) -> None:
    _write_image(tmp_path / "elsewhere" / "e.png")
    root = tmp_path / "data"
    _write_image(root / "Sad" / "s.png")
    (root / "Happy").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    result = scan_labelled_folder(root)
    assert result.class_counts["Happy"] == 0
    assert "Happy" not in result.folder_map


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="does not exist"):
        scan_labelled_folder(tmp_path / "nope")


def test_root_is_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file.png"
    _write_image(path)
    with pytest.raises(DatasetError, match="not a directory"):
        scan_labelled_folder(path)


def test_no_known_class_lists_seen_and_expected(tmp_path: Path) -> None:
    _write_image(tmp_path / "Contempt" / "c.png")
    (tmp_path / "Neutral").mkdir()
    _write_image(tmp_path / "Happy" / "notes.txt")  # a known folder with no images
    with pytest.raises(DatasetError) as excinfo:
        scan_labelled_folder(tmp_path)
    message = str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)
    for name in ("Contempt", "Neutral", "Happy", *EMOTIONS):
        assert name in message


def test_empty_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="folders seen: none"):
        scan_labelled_folder(tmp_path)


def test_fingerprint_is_stable(data_root: Path, tmp_path: Path) -> None:
    first = scan_labelled_folder(data_root).fingerprint()
    assert len(first) == 64
    assert int(first, 16) >= 0
    assert scan_labelled_folder(data_root).fingerprint() == first
    assert scan_labelled_folder(str(data_root)).fingerprint() == first

    # Same files under a different root directory -> same fingerprint (paths are relative).
    moved = tmp_path / "moved"
    data_root.rename(moved)
    assert scan_labelled_folder(moved).fingerprint() == first


def test_fingerprint_ignores_item_order(data_root: Path) -> None:
    result = scan_labelled_folder(data_root)
    shuffled = ScanResult(
        items=list(reversed(result.items)),
        class_counts=result.class_counts,
        unknown_folders=result.unknown_folders,
        folder_map=result.folder_map,
        root=result.root,
    )
    assert shuffled.fingerprint() == result.fingerprint()


def test_fingerprint_is_sensitive(data_root: Path) -> None:
    base = scan_labelled_folder(data_root).fingerprint()
    seen = {base}

    _write_image(data_root / "Sad" / "s2.png")  # a new file
    seen.add(scan_labelled_folder(data_root).fingerprint())

    with (data_root / "Sad" / "s2.png").open("ab") as handle:  # size change
        handle.write(b"\0" * 10)
    seen.add(scan_labelled_folder(data_root).fingerprint())

    (data_root / "Sad" / "s2.png").rename(data_root / "Sad" / "s3.png")  # rename
    seen.add(scan_labelled_folder(data_root).fingerprint())

    (data_root / "Sad" / "s3.png").rename(data_root / "Angry" / "s3.png")  # relabel
    seen.add(scan_labelled_folder(data_root).fingerprint())

    assert len(seen) == 5

    result = scan_labelled_folder(data_root)
    relabelled = ScanResult(
        items=[LabelledImage(i.path, (i.label + 1) % 5) for i in result.items],
        class_counts=result.class_counts,
        unknown_folders=result.unknown_folders,
        folder_map=result.folder_map,
        root=result.root,
    )
    assert relabelled.fingerprint() != result.fingerprint()


def test_unknown_folder_content_does_not_change_fingerprint(data_root: Path) -> None:
    base = scan_labelled_folder(data_root).fingerprint()
    _write_image(data_root / "Contempt" / "c4.png")
    assert scan_labelled_folder(data_root).fingerprint() == base


def test_fingerprint_of_deleted_file_is_a_dataset_error(data_root: Path) -> None:
    result = scan_labelled_folder(data_root)
    result.items[0].path.unlink()
    with pytest.raises(DatasetError, match="cannot fingerprint"):
        result.fingerprint()
