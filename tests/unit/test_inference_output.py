"""The seed's output contract: per-image JSON records and the human summary table."""

from __future__ import annotations

import json

import numpy as np
import pytest

from face_emotions.labels import EMOTIONS
from face_emotions.serving.seed_format import RULE
from face_emotions.serving.seed_format import THIN_RULE
from face_emotions.serving.seed_format import configuration_block
from face_emotions.serving.seed_format import inference_document
from face_emotions.serving.seed_format import prediction_record
from face_emotions.serving.seed_format import summary_table

HAPPY = [0.02, 0.03, 0.8934, 0.05, 0.0066]


def _probs(winner: int, confidence: float = 0.6) -> list[float]:
    rest = (1.0 - confidence) / (len(EMOTIONS) - 1)
    return [confidence if i == winner else rest for i in range(len(EMOTIONS))]


def test_record_shape() -> None:
    record = prediction_record("images/25.png", np.array(HAPPY, dtype=np.float32))
    assert list(record) == [
        "image_path",
        "predicted_class",
        "predicted_emotion",
        "confidence",
        "all_probabilities",
    ]
    assert record["image_path"] == "images/25.png"
    assert record["predicted_class"] == 2
    assert record["predicted_emotion"] == "Happy"
    assert record["confidence"] == 0.8934
    assert list(record["all_probabilities"]) == list(EMOTIONS)
    assert record["all_probabilities"] == {
        "Angry": 0.02,
        "Fear": 0.03,
        "Happy": 0.8934,
        "Sad": 0.05,
        "Surprised": 0.0066,
    }
    # float32 input becomes plain JSON numbers, rounded to 4 decimals.
    assert json.loads(json.dumps(record)) == record
    assert type(record["predicted_class"]) is int
    assert all(type(v) is float for v in record["all_probabilities"].values())


def test_record_rounds_to_four_decimals() -> None:
    record = prediction_record("x.png", [0.123456, 0.87654, 0.0, 0.0, 0.000004])
    assert record["predicted_emotion"] == "Fear"
    assert record["confidence"] == 0.8765
    assert record["all_probabilities"]["Angry"] == 0.1235
    assert record["all_probabilities"]["Surprised"] == 0.0


def test_record_needs_five_probabilities() -> None:
    with pytest.raises(ValueError):
        prediction_record("x.png", [0.5, 0.5])


def test_document_without_errors() -> None:
    predictions = [prediction_record("a.png", HAPPY)]
    document = inference_document("bundle/", "images", predictions)
    assert document == {
        "model_checkpoint": "bundle/",
        "images_path": "images",
        "num_images": 1,
        "predictions": predictions,
    }


def test_document_with_errors() -> None:
    errors = [{"image_path": "bad.png", "error": "empty file"}]
    document = inference_document("m", "p", [], errors)
    assert document["num_images"] == 0
    assert document["num_errors"] == 1
    assert document["errors"] == errors


def test_summary_table() -> None:
    predictions = [
        prediction_record("some/dir/25.png", HAPPY),
        prediction_record("7.jpg", _probs(0, 0.5)),
        prediction_record("8.jpg", _probs(2, 0.7)),
    ]
    errors = [{"image_path": "x/broken.png", "error": "not an image"}]
    lines = summary_table(predictions, errors).splitlines()
    assert lines[:3] == [RULE, "Summary:", RULE]
    assert lines[-1] == RULE
    assert "  Happy: 2" in lines
    assert "  Angry: 1" in lines
    assert not any(line.startswith(("  Fear:", "  Sad:", "  Surprised:")) for line in lines)
    assert "  unreadable: 1" in lines
    assert THIN_RULE in lines
    assert "  25.png: Happy (89.34%)" in lines
    assert "  7.jpg: Angry (50.00%)" in lines
    assert "  broken.png: ERROR not an image" in lines
    # Counts come in class order, before the per-image rows.
    assert lines.index("  Angry: 1") < lines.index("  Happy: 2") < lines.index(THIN_RULE)
    assert lines.index(THIN_RULE) < lines.index("  25.png: Happy (89.34%)")


def test_summary_single_happy_line() -> None:
    lines = summary_table([prediction_record("25.png", HAPPY)]).splitlines()
    assert lines == [
        RULE,
        "Summary:",
        RULE,
        "  Happy: 1",
        THIN_RULE,
        "  25.png: Happy (89.34%)",
        RULE,
    ]


def test_summary_row_cap() -> None:
    predictions = [prediction_record(f"{i}.png", _probs(i % 5)) for i in range(7)]
    errors = [{"image_path": f"bad{i}.png", "error": "empty file"} for i in range(4)]
    lines = summary_table(predictions, errors, max_rows=2).splitlines()
    image_rows = [line for line in lines if line.endswith("%)")]
    assert image_rows == ["  0.png: Angry (60.00%)", "  1.png: Fear (60.00%)"]
    assert "  ... and 5 more" in lines
    error_rows = [line for line in lines if "ERROR" in line]
    assert error_rows == ["  bad0.png: ERROR empty file", "  bad1.png: ERROR empty file"]
    assert "  ... and 2 more errors" in lines
    # The counts still cover every image, not only the rows shown.
    assert "  Angry: 2" in lines and "  Fear: 2" in lines and "  Sad: 1" in lines


def test_summary_no_cap_message_when_within_limit() -> None:
    predictions = [prediction_record(f"{i}.png", _probs(0)) for i in range(3)]
    text = summary_table(predictions, max_rows=3)
    assert "more" not in text
    assert text.count("%)") == 3


def test_configuration_block() -> None:
    text = configuration_block({"Checkpoint": "m", "Batch size": 32})
    assert text.splitlines() == [
        RULE,
        "Inference Configuration:",
        RULE,
        "Checkpoint: m",
        "Batch size: 32",
        RULE,
    ]
