"""The one crop of a face, the face policies, and faces back to one record per image."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from face_emotions.faces.crop import FACE_POLICIES
from face_emotions.faces.crop import CropSpec
from face_emotions.faces.crop import crop_face
from face_emotions.faces.crop import regions
from face_emotions.faces.detection import Face
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.bundle import ModelSpec
from face_emotions.serving.face_regions import classify_regions


def _marked(size=(300, 200)) -> Image.Image:
    """A grey image with a white square at (100, 50)-(160, 110): where the crop lands shows."""
    pixels = np.full((size[1], size[0], 3), 90, dtype=np.uint8)
    pixels[50:110, 100:160] = 255
    return Image.fromarray(pixels)


def test_crop_is_a_square_of_margin_times_the_longer_side_centred_on_the_face() -> None:
    face = Face((100.0, 50.0, 160.0, 110.0), 0.99)
    crop = crop_face(_marked(), face, CropSpec(margin=1.5))
    assert crop.size == (90, 90)
    pixels = np.asarray(crop)
    # The face (white) is centred: 15 px of background each side.
    assert (pixels[15:75, 15:75] == 255).all()
    assert (pixels[:14] == 90).all() and (pixels[:, 76:] == 90).all()


def test_a_tall_box_is_squared_on_its_longer_side() -> None:
    crop = crop_face(_marked(), Face((120.0, 40.0, 140.0, 120.0), 0.99), CropSpec(margin=1.0))
    assert crop.size == (80, 80)


def test_a_face_at_the_edge_is_padded_with_the_surroundings_colour() -> None:
    image = Image.new("RGB", (100, 100), (10, 200, 30))
    crop = crop_face(image, Face((-10.0, -10.0, 30.0, 30.0), 0.99), CropSpec(margin=2.0))
    assert crop.size == (80, 80)
    assert (np.asarray(crop) == (10, 200, 30)).all()  # padding looks like the border, not black


def test_alignment_levels_the_eyes() -> None:
    """A face tilted 20 degrees: with align the eyes end up on one row of the crop."""
    pixels = np.zeros((200, 200, 3), dtype=np.uint8)
    left, right = (80, 100), (120, 115)  # (x, y): the right eye lower
    for x, y in (left, right):
        pixels[y - 3 : y + 4, x - 3 : x + 4] = 255
    image = Image.fromarray(pixels)
    face = Face((60.0, 70.0, 140.0, 150.0), 0.99, (left, right))
    straight = np.asarray(crop_face(image, face, CropSpec(margin=1.0, align=True)).convert("L"))
    ys, xs = np.nonzero(straight > 128)
    left_rows = ys[xs < straight.shape[1] // 2]
    right_rows = ys[xs >= straight.shape[1] // 2]
    assert abs(left_rows.mean() - right_rows.mean()) <= 2
    tilted = np.asarray(crop_face(image, face, CropSpec(margin=1.0)).convert("L"))
    ys, xs = np.nonzero(tilted > 128)
    assert ys[xs >= 40].mean() - ys[xs < 40].mean() > 10


@pytest.mark.parametrize(
    ("policy", "faces", "expected"),
    [
        ("all", [Face((0, 0, 50, 50), 0.99), Face((60, 0, 80, 20), 0.98)], [False, False]),
        ("largest", [Face((0, 0, 50, 50), 0.99), Face((60, 0, 80, 20), 0.98)], [False]),
        ("all", [], [True]),  # searched, nothing found: the whole image
        ("none", None, [True]),  # not searched
        ("none", [Face((0, 0, 50, 50), 0.99)], [True]),
    ],
)
def test_policies(policy: str, faces, expected: list[bool]) -> None:
    image = _marked()
    chosen = regions(image, faces, policy, CropSpec())
    assert [region.face is None for region in chosen] == expected
    for region in chosen:
        if region.face is None:
            assert region.image is image


def test_every_policy_is_offered() -> None:
    assert FACE_POLICIES == ("all", "largest", "none")


def test_classify_regions_one_forward_pass_and_one_record_per_image() -> None:
    calls: list[int] = []
    outputs = iter(np.eye(5, dtype=np.float32)[[2, 3, 0, 4]])

    def predict(crops):
        calls.append(len(crops))
        return [next(outputs) for _ in crops]

    big, small = Face((10, 10, 90, 90), 0.99), Face((150, 20, 180, 50), 0.97)
    images = [_marked(), _marked(), _marked()]
    results = classify_regions(
        images, [[big, small], [], None], policy="all", spec=CropSpec(), predict=predict
    )
    assert calls == [4]  # two faces + two whole images in one pass
    two, none_found, not_searched = results
    assert two.faces_found == 2 and [f["predicted_emotion"] for f in two.faces] == [
        EMOTIONS[2],
        EMOTIONS[3],
    ]
    assert two.probabilities == pytest.approx(list(np.eye(5)[2]))  # the largest face's
    assert two.faces[0]["box"] == [10, 10, 90, 90] and two.faces[1]["index"] == 1
    assert none_found.faces_found == 0 and none_found.faces[0]["whole_image"]
    assert none_found.faces[0]["box"] == [0, 0, 300, 200]
    assert not_searched.faces_found is None
    assert two.size == (300, 200)


def test_model_specs_record_their_crop_and_old_bundles_read_as_whole_image_models() -> None:
    spec = ModelSpec.for_architecture(
        "cnn", 32, crop=CropSpec(faces="detect", margin=1.4, align=True)
    )
    again = ModelSpec.from_dict(spec.to_dict())
    assert again.crop == CropSpec(faces="detect", margin=1.4, align=True)
    old = spec.to_dict()
    del old["crop"]
    assert ModelSpec.from_dict(old).crop == CropSpec()
    assert CropSpec().faces == "none" and 1.1 <= CropSpec().margin <= 1.2
