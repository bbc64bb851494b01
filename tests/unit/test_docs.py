"""Documentation that must stay true to the code."""

from __future__ import annotations

import re
from pathlib import Path

from face_emotions.settings import Settings

README = Path(__file__).resolve().parents[2] / "README.md"


def test_every_setting_is_in_the_readme_table() -> None:
    documented = set(
        re.findall(r"^\| `(EMOTIONS_[A-Z0-9_]+)` \|", README.read_text(), re.MULTILINE)
    )
    expected = {f"EMOTIONS_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from README's configuration table"
    assert documented - expected == set(), "README documents settings that do not exist"


def test_readme_names_the_two_commands_and_the_seed_shape() -> None:
    text = README.read_text()
    assert "make test" in text
    for key in ("image_path", "predicted_class", "predicted_emotion", "confidence"):
        assert f'"{key}"' in text
