"""Importing ONNX models: the spec, the label mapping, and every check that refuses a model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from face_emotions.labels import EMOTIONS
from face_emotions.modeling.import_spec import ImportRefused
from face_emotions.modeling.import_spec import ImportSpec
from face_emotions.modeling.import_spec import load_spec_text
from face_emotions.modeling.import_spec import map_labels
from face_emotions.modeling.import_spec import preprocess
from face_emotions.modeling.import_spec import to_emotions
from face_emotions.modeling.onnx_import import check_model
from tests.onnx_models import FER7
from tests.onnx_models import FER8
from tests.onnx_models import make_model

LIMIT = 64 * 2**20

SPEC_YAML = """
input_size: 64
colour: gray
layout: NCHW
scale: 0.00392156862745098
mean: [0.5]
std: [0.5]
output: logits
labels: [angry, disgust, fear, happy, sad, surprise, neutral]
face_crop: {faces: detect, margin: 1.2}
source: "FER-2013 CNN, MIT licence"
"""


def test_spec_yaml_is_parsed() -> None:
    spec = load_spec_text(SPEC_YAML)
    assert (spec.input_size, spec.colour, spec.layout, spec.channels) == (64, "gray", "NCHW", 1)
    assert spec.face_crop.crop_spec().faces == "detect"
    assert load_spec_text(spec.to_yaml()) == spec


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[1, 2]", "must be a YAML mapping"),
        ("input_size: [", "not valid YAML"),
        ("input_size: 64\nlabels: [a, b]\nlayout: NWHC", "invalid spec: layout"),
        ("input_size: 64\nlabels: [a, b]\ncolour: rgb\nmean: [1, 2]", "mean has 2 values"),
        ("input_size: 64\nlabels: [a, b]\nstd: [0]", "std values must be positive"),
        ("input_size: 64\nlabels: [a, b]\nsize: 3", "invalid spec: size"),
    ],
)
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ImportRefused, match=message):
        load_spec_text(text)


def test_label_mapping_of_fer7_and_fer8() -> None:
    seven = map_labels(FER7)
    assert seven.to_dict() == {
        "angry": "Angry",
        "disgust": None,
        "fear": "Fear",
        "happy": "Happy",
        "sad": "Sad",
        "surprise": "Surprised",
        "neutral": None,
    }
    assert seven.source == (0, 2, 3, 4, 5)
    eight = map_labels(FER8)
    assert eight.source == (4, 6, 1, 3, 2)
    assert eight.dropped == ("neutral", "disgust", "contempt")
    assert "contempt -> (dropped)" in eight.describe()


def test_renormalisation_against_a_hand_computation() -> None:
    logits = np.array([[1.0, 2.0, 0.5, 3.0, -1.0, 0.0, 4.0]])  # FER7 order
    p = np.exp(logits[0]) / np.exp(logits[0]).sum()  # softmax over all seven
    kept = np.array([p[0], p[2], p[3], p[4], p[5]])  # angry fear happy sad surprise
    expected = kept / kept.sum()  # neutral and disgust dropped, the rest renormalised
    spec = ImportSpec(input_size=48, labels=FER7)
    mapping = map_labels(FER7)
    np.testing.assert_allclose(to_emotions(spec, mapping, logits)[0], expected, rtol=1e-6)
    as_probabilities = spec.model_copy(update={"output": "probabilities"})
    np.testing.assert_allclose(
        to_emotions(as_probabilities, mapping, p[None])[0], expected, rtol=1e-6
    )
    # All mass on dropped classes: uniform, never 0/0.
    zero = np.array([[0, 0.5, 0, 0, 0, 0, 0.5]])
    np.testing.assert_allclose(to_emotions(as_probabilities, mapping, zero)[0], [0.2] * 5)


def test_preprocessing_by_hand() -> None:
    batch = np.zeros((1, 2, 2, 3), dtype=np.uint8)
    batch[0, 0, 0] = (255, 0, 0)
    gray = ImportSpec(input_size=8, colour="gray", labels=FER7, mean=[0.5], std=[0.5])
    x = preprocess(gray, batch)
    assert x.shape == (1, 1, 2, 2) and x.dtype == np.float32
    assert x[0, 0, 0, 0] == pytest.approx((0.299 - 0.5) / 0.5)
    assert x[0, 0, 1, 1] == pytest.approx(-1.0)
    bgr = ImportSpec(
        input_size=8, colour="bgr", layout="NHWC", scale=1.0, mean=[0.0], std=[1.0], labels=FER7
    )
    assert preprocess(bgr, batch)[0, 0, 0].tolist() == [0.0, 0.0, 255.0]


@pytest.mark.parametrize(
    ("labels", "colour", "layout", "output"),
    [
        (FER7, "gray", "NCHW", "logits"),
        (FER8, "rgb", "NHWC", "probabilities"),
        (FER7, "bgr", "NHWC", "logits"),
        (FER8, "gray", "NHWC", "logits"),
    ],
)
def test_good_models_pass(tmp_path: Path, labels, colour, layout, output) -> None:
    path, spec = make_model(tmp_path, labels=labels, colour=colour, layout=layout, output=output)
    checked = check_model(path, spec, max_bytes=LIMIT)
    assert checked.fixed_batch is None and len(checked.sha256) == 64
    assert checked.mapping.source == map_labels(labels).source


def _refusal(path: Path, spec: ImportSpec, max_bytes: int = LIMIT) -> str:
    with pytest.raises(ImportRefused) as info:
        check_model(path, spec, max_bytes=max_bytes)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_bad_import_has_its_own_message(tmp_path: Path) -> None:
    good, spec = make_model(tmp_path)
    messages = {}
    text = tmp_path / "not.onnx"
    text.write_text("this is not a model")
    messages["not onnx"] = _refusal(text, spec)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    messages["truncated"] = _refusal(truncated, spec)
    messages["shape"] = _refusal(good, spec.model_copy(update={"input_size": 64}))
    messages["layout"] = _refusal(good, spec.model_copy(update={"layout": "NHWC"}))
    messages["labels"] = _refusal(good, spec.model_copy(update={"labels": FER8}))
    messages["unmapped"] = _refusal(
        good, spec.model_copy(update={"labels": [*FER7[:4], "bored", *FER7[5:]]})
    )
    nan, nan_spec = make_model(tmp_path, nan=True)
    messages["nan"] = _refusal(nan, nan_spec)
    messages["size"] = _refusal(good, spec, max_bytes=1024)
    messages["probabilities"] = _refusal(good, spec.model_copy(update={"output": "probabilities"}))
    assert "not an ONNX model" in messages["not onnx"]
    assert "truncated or corrupt" in messages["truncated"]
    assert "input has shape" in messages["shape"] and "64" in messages["shape"]
    assert "input has shape" in messages["layout"] and "NHWC" in messages["layout"]
    assert "output has shape" in messages["labels"] and "8 labels" in messages["labels"]
    assert "no label maps to Sad" in messages["unmapped"]
    assert "non-finite outputs" in messages["nan"]
    assert "over the import limit" in messages["size"]
    assert "set output: logits" in messages["probabilities"]
    assert len(set(messages.values())) == len(messages)


def test_every_class_is_covered_by_the_alias_table() -> None:
    spelled = ["anger", "fearful", "happiness", "sadness", "surprise", "neutral"]
    assert [spelled[i] for i in map_labels(spelled).source] == spelled[:5]
    assert len(EMOTIONS) == 5


def test_the_readme_example_spec_is_valid() -> None:
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    block = readme.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert block.startswith("# fer7-gray64.yaml")
    spec = load_spec_text(block)
    assert (spec.input_size, spec.colour, len(spec.labels)) == (64, "gray", 7)
    assert map_labels(spec.labels).dropped == ("disgust", "neutral")
