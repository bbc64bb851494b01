"""The label vocabulary is the model's output layout, so its order and aliases are pinned."""

from __future__ import annotations

import pytest

from face_emotions.labels import ALIASES
from face_emotions.labels import EMOTIONS
from face_emotions.labels import NUM_CLASSES
from face_emotions.labels import canonical_emotion
from face_emotions.labels import class_index

ALIAS_TABLE = {
    "Angry": ["angry", "anger", "mad"],
    "Fear": ["fear", "fearful", "afraid", "scared"],
    "Happy": ["happy", "happiness", "joy", "smile"],
    "Sad": ["sad", "sadness"],
    "Surprised": ["surprise", "suprise", "surprised", "surprize", "surprized"],
}
ALL_ALIASES = [(alias, canonical) for canonical, names in ALIAS_TABLE.items() for alias in names]


def test_order_and_count_are_fixed() -> None:
    assert EMOTIONS == ("Angry", "Fear", "Happy", "Sad", "Surprised")
    assert NUM_CLASSES == 5 == len(EMOTIONS)


def test_alias_table_is_exactly_the_documented_one() -> None:
    assert dict(ALIASES) == {alias: canonical for alias, canonical in ALL_ALIASES}
    with pytest.raises(TypeError):
        ALIASES["neutral"] = "Happy"  # type: ignore[index]


@pytest.mark.parametrize(("alias", "canonical"), ALL_ALIASES)
def test_every_alias_maps_to_its_class(alias: str, canonical: str) -> None:
    for spelling in (
        alias,
        alias.upper(),
        alias.title(),
        f"  {alias}\n",
        f"_{alias}-",
        f"-_{alias}_",
    ):
        assert canonical_emotion(spelling) == canonical
        assert class_index(spelling) == EMOTIONS.index(canonical)


@pytest.mark.parametrize("name", EMOTIONS)
def test_canonical_names_map_to_themselves(name: str) -> None:
    assert canonical_emotion(name) == name
    assert class_index(name) == EMOTIONS.index(name)


def test_kaggle_spelling() -> None:
    assert canonical_emotion("Suprise") == "Surprised"
    assert class_index("Suprise") == 4


@pytest.mark.parametrize(
    "name", ["Contempt", "neutral", "disgust", "", "   ", "ha ppy", "happy2", "sad-face", "__"]
)
def test_unknown_names(name: str) -> None:
    assert canonical_emotion(name) is None
    with pytest.raises(ValueError, match="unknown emotion") as excinfo:
        class_index(name)
    message = str(excinfo.value)
    for emotion in EMOTIONS:
        assert emotion in message


def test_non_string_is_unknown() -> None:
    assert canonical_emotion(3) is None  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown emotion"):
        class_index(None)  # type: ignore[arg-type]
