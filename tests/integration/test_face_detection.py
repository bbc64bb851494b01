"""Face detection (MTCNN) on real photographs, and ``face-emotions infer`` classifying faces.

Boxes are checked against hand-measured ones (tests/real_photos.py): exactly one face on each
single-face photo, all six on the group photo, none on photos without a person, and the whole
image classified (and said so) when there is no face.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from face_emotions.cli.main import main
from face_emotions.data.images import decode_image
from face_emotions.faces.detection import FaceDetector
from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.bundle import save_bundle
from face_emotions.modeling.zoo import create_model
from tests.real_photos import ASTRONAUT_FACE
from tests.real_photos import CAMERAMAN_FACE
from tests.real_photos import GROUP_FACES
from tests.real_photos import NO_FACE_PHOTOS
from tests.real_photos import assert_same_faces
from tests.real_photos import group_photo
from tests.real_photos import iou
from tests.real_photos import skimage_photo

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def detector() -> FaceDetector:
    return FaceDetector()


def _boxes(faces) -> list[tuple[float, ...]]:
    return [face.box for face in faces]


@pytest.mark.parametrize(
    ("name", "box"), [("astronaut.png", ASTRONAUT_FACE), ("camera.png", CAMERAMAN_FACE)]
)
def test_exactly_one_face_on_a_single_face_photo(
    detector: FaceDetector, name: str, box: tuple
) -> None:
    faces = detector.detect(decode_image(skimage_photo(name)))
    assert_same_faces(_boxes(faces), [box])
    assert faces[0].score >= 0.95 and len(faces[0].landmarks) == 5


def test_every_face_of_a_group_photo(detector: FaceDetector) -> None:
    faces = detector.detect(decode_image(group_photo()))
    assert_same_faces(_boxes(faces), GROUP_FACES)
    areas = [face.area for face in faces]
    assert areas == sorted(areas, reverse=True)  # largest first


@pytest.mark.parametrize("name", NO_FACE_PHOTOS)
def test_no_face_where_there_is_none(detector: FaceDetector, name: str) -> None:
    assert detector.detect(decode_image(skimage_photo(name))) == []


def test_boxes_are_in_the_original_pixels_of_a_large_photo(detector: FaceDetector) -> None:
    """Detection runs on a copy at most 640 px long; boxes come back in the photo's pixels."""
    image = decode_image(skimage_photo("astronaut.png")).resize((1536, 1536))
    [face] = detector.detect(image)
    assert iou(face.box, [3 * v for v in ASTRONAUT_FACE]) >= 0.5


def test_boxes_follow_exif_rotation(detector: FaceDetector, tmp_path: Path) -> None:
    """A phone photo stored sideways with an EXIF orientation: boxes are in the upright image."""
    upright = decode_image(skimage_photo("astronaut.png"))
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the sensor wrote
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = tmp_path / "phone.jpg"
    stored.save(path, format="JPEG", exif=exif, quality=95)
    image = decode_image(path)
    assert image.size == upright.size
    [face] = detector.detect(image)
    assert iou(face.box, ASTRONAUT_FACE) >= 0.5


def test_images_of_one_size_share_a_pass_with_the_same_boxes(detector: FaceDetector) -> None:
    photos = [decode_image(skimage_photo(n)) for n in ("astronaut.png", "camera.png")]
    together = detector.detect_many(photos)
    alone = [detector.detect(photo) for photo in photos]
    for many, one in zip(together, alone, strict=True):
        assert len(many) == len(one) == 1
        assert np.allclose(many[0].box, one[0].box, atol=1.0)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _transparent_astronaut() -> Image.Image:
    rgba = decode_image(skimage_photo("astronaut.png")).convert("RGBA")
    alpha = np.zeros(rgba.size[::-1], dtype=np.uint8)
    alpha[40:220, 150:300] = 255  # only the head is opaque
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


@pytest.mark.parametrize(
    ("make", "faces"),
    [
        (lambda: Image.new("RGB", (1, 1), "white"), 0),
        (lambda: Image.new("RGB", (20000, 30), (30, 90, 200)), 0),  # a panorama strip
        (lambda: Image.new("RGB", (640, 480), (128, 128, 128)), 0),  # one colour
        (_transparent_astronaut, 1),  # PNG with alpha
    ],
    ids=["1x1", "panorama-strip", "one-colour", "png-alpha"],
)
def test_awkward_images_never_crash_detection(detector: FaceDetector, make, faces: int) -> None:
    image = decode_image(_png(make()))
    assert image.mode == "RGB"
    assert len(detector.detect(image)) == faces


# -- face-emotions infer ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec.for_architecture("cnn", 32, options={"width": 8})
    return save_bundle(
        tmp_path_factory.mktemp("bundle") / "b", create_model("cnn", width=8).eval(), spec
    )


def _infer(*args: str):
    result = CliRunner().invoke(main, ["infer", *args], catch_exceptions=False)
    return result


def test_infer_classifies_every_face_of_real_photos(bundle_dir: Path) -> None:
    photos = [skimage_photo("astronaut.png"), group_photo(), skimage_photo("coffee.png")]
    result = _infer("--model", str(bundle_dir), *map(str, photos))
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    astronaut, group, coffee = document["predictions"]

    assert astronaut["faces_found"] == 1
    assert_same_faces([face["box"] for face in astronaut["faces"]], [ASTRONAUT_FACE])
    assert group["faces_found"] == 6
    assert_same_faces([face["box"] for face in group["faces"]], GROUP_FACES)
    assert [face["index"] for face in group["faces"]] == list(range(6))
    # The seed's image-level fields are the largest face's.
    largest = group["faces"][0]
    assert group["predicted_emotion"] == largest["predicted_emotion"]
    assert group["all_probabilities"] == largest["all_probabilities"]
    assert coffee["faces_found"] == 0
    [whole] = coffee["faces"]
    assert whole["whole_image"] and whole["box"] == [0, 0, 600, 400]
    assert "faces: 7 in 2 images" in result.stderr
    assert "images without a face (classified whole): 1" in result.stderr
    assert "[6 faces]" in result.stderr and "[no face]" in result.stderr


def test_infer_face_policies(bundle_dir: Path) -> None:
    def group(policy: str) -> dict:
        args = ("--model", str(bundle_dir), "--quiet", "--faces", policy, str(group_photo()))
        result = _infer(*args)
        assert result.exit_code == 0, result.output
        [record] = json.loads(result.stdout)["predictions"]
        return record

    every, largest, whole = group("all"), group("largest"), group("none")
    assert every["faces_found"] == largest["faces_found"] == 6
    assert len(every["faces"]) == 6 and len(largest["faces"]) == 1
    assert largest["faces"][0] == every["faces"][0]  # the largest face, classified the same
    assert largest["all_probabilities"] == every["all_probabilities"]
    assert whole["faces_found"] is None and whole["faces"][0]["whole_image"]
    assert whole["faces"][0]["box"] == [0, 0, 1280, 886]
