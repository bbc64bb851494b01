"""``data.faces=detect`` on a labelled folder: crop once, cache by content, count what was found.

The detector is a stand-in that "finds" a face where the image has a white square, so the
cache and the counting are tested without MTCNN (the real detector has its own tests).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from face_emotions.data.labelled_folder import LabelledImage
from face_emotions.faces.crop import CropSpec
from face_emotions.faces.detection import Face
from training.face_crops import FaceCropping
from training.face_crops import crop_labelled_images


class SquareFinder:
    """Faces are the white squares of an image (0, 1 or 2 of them)."""

    min_score, min_face, max_side = 0.95, 20, 320

    def __init__(self) -> None:
        self.searched = 0

    def detect_many(self, images: list[Image.Image]) -> list[list[Face]]:
        self.searched += len(images)
        found = []
        for image in images:
            pixels = np.asarray(image.convert("L"))
            faces = []
            for x0 in (10, 70):
                if pixels[30, x0 + 5] == 255:
                    faces.append(Face((x0, 20.0, x0 + 30.0, 50.0), 0.99))
            found.append(faces)
        return found


def picture(path: Path, squares: int, shade: int = 80) -> Path:
    pixels = np.full((80, 120, 3), shade, dtype=np.uint8)
    for x0 in (10, 70)[:squares]:
        pixels[20:50, x0 : x0 + 30] = 255
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture
def items(tmp_path: Path) -> list[LabelledImage]:
    return [
        LabelledImage(picture(tmp_path / "data/Happy/one.png", 1), 2),
        LabelledImage(picture(tmp_path / "data/Happy/two.png", 2, shade=60), 2),
        LabelledImage(picture(tmp_path / "data/Sad/none.png", 0), 3),
    ]


def test_faces_are_cropped_once_and_counted(tmp_path: Path, items) -> None:
    broken = tmp_path / "data/Sad/broken.png"
    broken.write_bytes(b"not an image")
    finder = SquareFinder()
    cropped = crop_labelled_images(
        [*items, LabelledImage(broken, 3)], CropSpec(margin=1.0), finder, tmp_path / "cache"
    )
    report = cropped.report
    assert report.to_dict() == {
        "images": 4,
        "cropped": 2,
        "no_face": 1,
        "several_faces": 1,
        "skipped": 0,
        "cached": 0,
        "unreadable": 1,
    }
    one, two, none = cropped.items
    assert none.path == items[2].path  # no face: the whole image, as serving does
    for item in (one, two):
        assert cropped.sources[item.path] in {items[0].path, items[1].path}
        with Image.open(item.path) as crop:
            assert crop.size == (30, 30)  # the square around the (largest) face
    assert [item.label for item in cropped.items] == [2, 2, 3]


def test_the_cache_is_keyed_by_content_and_crop(tmp_path: Path, items) -> None:
    cache = tmp_path / "cache"
    crop_labelled_images(items, CropSpec(), SquareFinder(), cache)
    # Renamed and moved: the same content is not searched again.
    moved = [
        LabelledImage(item.path.rename(item.path.with_name("x-" + item.path.name)), item.label)
        for item in items
    ]
    finder = SquareFinder()
    again = crop_labelled_images(moved, CropSpec(), finder, cache)
    assert finder.searched == 0 and again.report.cached == 3
    # Another margin is another crop: searched and cut anew.
    wider = SquareFinder()
    crop_labelled_images(moved, CropSpec(margin=1.5), wider, cache)
    assert wider.searched == 3
    # An edited image is new content.
    picture(moved[0].path, 1, shade=200)
    edited = SquareFinder()
    crop_labelled_images(moved, CropSpec(), edited, cache)
    assert edited.searched == 1


def test_images_without_a_face_can_be_left_out(tmp_path: Path, items) -> None:
    cropped = crop_labelled_images(
        items, CropSpec(), SquareFinder(), tmp_path / "cache", no_face="skip"
    )
    assert len(cropped.items) == 2 and cropped.report.skipped == 1
    with pytest.raises(ValueError, match="keep, skip"):
        crop_labelled_images(items, CropSpec(), SquareFinder(), tmp_path / "c", no_face="drop")


def test_progress_is_reported(tmp_path: Path, items) -> None:
    seen: list[tuple[int, int]] = []
    cropping = FaceCropping(
        spec=CropSpec(),
        cache_dir=tmp_path / "cache",
        detector_factory=SquareFinder,  # type: ignore[arg-type]
        on_progress=lambda done, total: seen.append((done, total)),
    )
    cropping.crop(items)
    assert seen[-1] == (3, 3)
