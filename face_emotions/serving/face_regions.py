"""From decoded images and their faces to what is classified, and back to one row per image.

Each image becomes one or more regions (its faces, cropped as the serving model was trained,
or the whole image); all regions of a micro-batch go through one forward pass; the
probabilities come back as one result per image whose image-level fields describe its largest
face and whose ``faces`` list carries every face. The worker, ``face-emotions infer`` and the
evaluation of a model all classify through :func:`classify_regions`, so they cannot disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from face_emotions.faces.crop import CropSpec
from face_emotions.faces.crop import Region
from face_emotions.faces.crop import regions
from face_emotions.faces.detection import Face
from face_emotions.labels import EMOTIONS


@dataclass(frozen=True)
class ClassifiedImage:
    """One image's outcome: the largest face's probabilities and every face's record."""

    probabilities: list[float]
    faces: list[dict[str, Any]]
    #: Faces the detector found (0: none, the whole image was classified); None: not searched.
    faces_found: int | None
    #: The image's (width, height): the frame of the boxes.
    size: tuple[int, int]


def classify_regions(
    images: Sequence[Image.Image],
    faces: Sequence[list[Face] | None],
    *,
    policy: str,
    spec: CropSpec,
    predict: Callable[[list[Image.Image]], np.ndarray | Sequence[Sequence[float]]],
) -> list[ClassifiedImage]:
    """Classify every region of ``images`` in one call of ``predict``."""
    per_image: list[list[Region]] = [
        regions(image, image_faces, policy, spec)
        for image, image_faces in zip(images, faces, strict=True)
    ]
    flat = [region.image for image_regions in per_image for region in image_regions]
    probabilities = predict(flat) if flat else []
    results: list[ClassifiedImage] = []
    position = 0
    for image, image_faces, image_regions in zip(images, faces, per_image, strict=True):
        records = []
        for index, region in enumerate(image_regions):
            row = [float(p) for p in probabilities[position]]
            position += 1
            records.append({**region.describe(index, image.size), **_prediction(row)})
        found = None if policy == "none" or image_faces is None else len(image_faces)
        largest = records[0]
        results.append(
            ClassifiedImage(
                [largest["all_probabilities"][name] for name in EMOTIONS],
                records,
                found,
                image.size,
            )
        )
    return results


def _prediction(probabilities: list[float]) -> dict[str, Any]:
    index = int(np.argmax(probabilities))
    return {
        "predicted_class": index,
        "predicted_emotion": EMOTIONS[index],
        "confidence": probabilities[index],
        "all_probabilities": dict(zip(EMOTIONS, probabilities, strict=True)),
    }
