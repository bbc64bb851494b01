"""The class vocabulary shared by training, the model registry and inference.

The order of ``EMOTIONS`` *is* the model's output layout: index ``i`` of a logits vector
means ``EMOTIONS[i]``. Changing the order silently swaps predictions of every model that
was trained before, so it must never be reordered; the aliases exist so that folder names
found in the wild (Kaggle spells it "Suprise") still land on the canonical class.
"""

from __future__ import annotations

import string
from collections.abc import Mapping
from types import MappingProxyType
from typing import Final

EMOTIONS: Final[tuple[str, ...]] = ("Angry", "Fear", "Happy", "Sad", "Surprised")
NUM_CLASSES: Final[int] = 5

_ALIAS_LISTS: Final[dict[str, tuple[str, ...]]] = {
    "Angry": ("angry", "anger", "mad"),
    "Fear": ("fear", "fearful", "afraid", "scared"),
    "Happy": ("happy", "happiness", "joy", "smile"),
    "Sad": ("sad", "sadness"),
    "Surprised": ("surprise", "suprise", "surprised", "surprize", "surprized"),
}

#: Normalised alias -> canonical class name (read-only so no caller can add a sixth class).
ALIASES: Final[Mapping[str, str]] = MappingProxyType(
    {alias: canonical for canonical, aliases in _ALIAS_LISTS.items() for alias in aliases}
)

_STRIP_CHARS: Final[str] = string.whitespace + "_-"

if len(EMOTIONS) != NUM_CLASSES or set(_ALIAS_LISTS) != set(EMOTIONS):  # pragma: no cover
    raise RuntimeError("labels.py is inconsistent: EMOTIONS, NUM_CLASSES and aliases disagree")


def _normalise(name: str) -> str:
    """Reduce a folder name to its alias key, so "_Happy-", " HAPPY " and "happy" agree."""
    return name.strip(_STRIP_CHARS).casefold()


def canonical_emotion(name: str) -> str | None:
    """Map a folder name or user-supplied label to its canonical class.

    Returns ``None`` rather than raising because callers (dataset scanning) need to report
    unknown folders and carry on, not stop at the first one.
    """
    if not isinstance(name, str):
        return None
    return ALIASES.get(_normalise(name))


def class_index(emotion: str) -> int:
    """Return the model output index of ``emotion`` (aliases accepted).

    Raises ``ValueError`` naming the valid classes, because a wrong label reaching training
    is a configuration mistake that the person reading the error has to fix by hand.
    """
    canonical = canonical_emotion(emotion)
    if canonical is None:
        raise ValueError(
            f"unknown emotion {emotion!r}; valid classes are {', '.join(EMOTIONS)} "
            f"(aliases, case-insensitive: {', '.join(sorted(ALIASES))})"
        )
    return EMOTIONS.index(canonical)
