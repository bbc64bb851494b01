"""What a model made elsewhere needs to be served here: its input, its output, its labels.

A public facial-expression model is an ONNX graph plus conventions its author wrote in a
README: 48 px grayscale or 224 px RGB, NCHW or NHWC, pixels in [0, 1] or [-1, 1] or ImageNet
normalised, logits or softmax, 7 or 8 labels in its own spelling. :class:`ImportSpec` makes
those conventions data (a YAML file), so a version imported here is served exactly as its
author ran it, and every version (trained here or not) can leave with the same description.

The mapping of the model's labels onto the five classes uses the same alias table as folder
names (:mod:`face_emotions.labels`); labels outside the five (neutral, disgust, contempt) are
dropped and the remaining probabilities renormalised, so a 7-class model answers the same
five-class question as a model trained here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from typing import Literal

import numpy as np
from pydantic import BaseModel
from pydantic import ConfigDict
from pydantic import Field
from pydantic import ValidationError
from pydantic import model_validator

from face_emotions.faces.crop import DEFAULT_MARGIN
from face_emotions.faces.crop import CropSpec
from face_emotions.labels import EMOTIONS
from face_emotions.labels import canonical_emotion

#: The greyscale weights of ITU-R BT.601 (what PIL's ``convert("L")`` uses), without rounding.
GRAY_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class ImportRefused(ValueError):
    """A model or its spec can't be imported; the message is one line that says why."""


class FaceCrop(BaseModel):
    """Which faces the model expects: tight detector crops (``detect``) or whole images."""

    model_config = ConfigDict(extra="forbid")

    faces: Literal["detect", "none"] = "none"
    margin: float = Field(default=DEFAULT_MARGIN, gt=0.5, le=4.0)
    align: bool = False

    def crop_spec(self) -> CropSpec:
        return CropSpec(faces=self.faces, margin=self.margin, align=self.align)


class ImportSpec(BaseModel):
    """The preprocessing and output contract of one ONNX model (what ``SPEC.yaml`` holds).

    A pixel reaches the model as ``(value * scale - mean[c]) / std[c]`` after resizing to
    ``input_size`` (bilinear, as training here resizes) and converting to ``colour``.
    """

    model_config = ConfigDict(extra="forbid")

    input_size: int = Field(ge=8, le=1024, description="Side of the square input, pixels.")
    colour: Literal["gray", "rgb", "bgr"] = "rgb"
    layout: Literal["NCHW", "NHWC"] = "NCHW"
    scale: float = Field(default=1.0 / 255.0, gt=0)
    mean: list[float] = Field(default_factory=lambda: [0.0])
    std: list[float] = Field(default_factory=lambda: [1.0])
    output: Literal["logits", "probabilities"] = "logits"
    labels: list[str] = Field(min_length=2, max_length=64)
    face_crop: FaceCrop = Field(default_factory=FaceCrop)
    source: str = Field(default="", max_length=2000, description="Where it came from, licence.")

    @property
    def channels(self) -> int:
        return 1 if self.colour == "gray" else 3

    @model_validator(mode="after")
    def _per_channel(self) -> ImportSpec:
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) not in (1, self.channels):
                raise ValueError(
                    f"{name} has {len(values)} values; give 1 or {self.channels} for "
                    f"colour {self.colour}"
                )
        if any(value <= 0 for value in self.std):
            raise ValueError("std values must be positive")
        return self

    def input_shape(self, batch: int | str = "N") -> list[int | str]:
        """The shape the ONNX input must have (batch symbolic unless given)."""
        side, channels = self.input_size, self.channels
        if self.layout == "NCHW":
            return [batch, channels, side, side]
        return [batch, side, side, channels]

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def parse_spec(data: Any) -> ImportSpec:
    """A spec from parsed YAML/JSON, with the first problem as one line."""
    if not isinstance(data, dict):
        raise ImportRefused("the spec must be a YAML mapping (input_size, colour, labels, ...)")
    try:
        return ImportSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "spec"
        raise ImportRefused(f"invalid spec: {where}: {first.get('msg')}") from exc


def load_spec_text(text: str | bytes) -> ImportSpec:
    """Parse ``SPEC.yaml`` (JSON is YAML too)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ImportRefused(f"the spec is not valid YAML: {str(exc).splitlines()[0]}") from exc
    return parse_spec(data)


@dataclass(frozen=True)
class LabelMapping:
    """Which model output feeds which of the five classes; the rest are dropped."""

    labels: tuple[str, ...]
    #: ``source[i]``: the model output index that becomes ``EMOTIONS[i]``.
    source: tuple[int, ...]
    dropped: tuple[str, ...]

    def to_dict(self) -> dict[str, str | None]:
        """Model label -> class (None: dropped); what is printed and stored with a version."""
        kept = {self.labels[index]: EMOTIONS[i] for i, index in enumerate(self.source)}
        return {label: kept.get(label) for label in self.labels}

    def describe(self) -> list[str]:
        return [
            f"{label} -> {emotion if emotion else '(dropped)'}"
            for label, emotion in self.to_dict().items()
        ]


def map_labels(labels: list[str] | tuple[str, ...]) -> LabelMapping:
    """Map a model's labels onto the five classes through the alias table.

    Refuses a label list that leaves one of the five classes unmapped (the model can't answer
    the question), and two labels landing on one class (which of them would it be?).
    """
    found: dict[str, int] = {}
    dropped: list[str] = []
    seen: set[str] = set()
    for index, label in enumerate(labels):
        key = label.strip().casefold()
        if key in seen:
            raise ImportRefused(f"label {label!r} appears twice in the spec's labels")
        seen.add(key)
        emotion = canonical_emotion(label)
        if emotion is None:
            dropped.append(label)
            continue
        if emotion in found:
            other = labels[found[emotion]]
            raise ImportRefused(f"labels {other!r} and {label!r} both map to {emotion}")
        found[emotion] = index
    missing = [emotion for emotion in EMOTIONS if emotion not in found]
    if missing:
        raise ImportRefused(
            f"no label maps to {', '.join(missing)}: the model's labels {list(labels)} must "
            f"cover all of {', '.join(EMOTIONS)} (aliases such as anger, fearful, happiness, "
            "surprise are accepted)"
        )
    return LabelMapping(tuple(labels), tuple(found[e] for e in EMOTIONS), tuple(dropped))


def preprocess(spec: ImportSpec, batch: np.ndarray) -> np.ndarray:
    """uint8 RGB NHWC batch already at ``input_size`` -> the float32 tensor the model takes."""
    if batch.ndim != 4 or batch.shape[-1] != 3:
        raise ValueError(f"expected a uint8 NHWC RGB batch, got shape {batch.shape}")
    x = batch.astype(np.float32)
    if spec.colour == "gray":
        x = (x @ GRAY_WEIGHTS)[..., None]
    elif spec.colour == "bgr":
        x = x[..., ::-1]
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    x = (x * np.float32(spec.scale) - mean) / std
    if spec.layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)
    return np.ascontiguousarray(x, dtype=np.float32)


def to_emotions(spec: ImportSpec, mapping: LabelMapping, outputs: np.ndarray) -> np.ndarray:
    """Model outputs (N, labels) -> probabilities over ``EMOTIONS`` (N, 5), rows summing to 1.

    Logits: a softmax over the kept outputs only, which equals softmax, drop, renormalise, but
    can't underflow to 0/0 when a dropped class (neutral) takes all the mass. Probabilities:
    dropped, then renormalised; a row with no mass left on the five is uniform.
    """
    outputs = np.asarray(outputs, dtype=np.float64)
    kept = outputs[:, list(mapping.source)]
    if spec.output == "logits":
        shifted = np.exp(kept - kept.max(axis=1, keepdims=True))
        return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)
    kept = np.clip(kept, 0.0, None)
    total = kept.sum(axis=1, keepdims=True)
    uniform = np.full_like(kept, 1.0 / kept.shape[1])
    with np.errstate(divide="ignore", invalid="ignore"):
        result = np.where(total > 0, kept / np.where(total > 0, total, 1.0), uniform)
    return result.astype(np.float32)
