"""The one crop of a face, used by training, evaluation and serving alike.

A model learns from what its training crops look like: how much forehead, chin and background
a face comes with. So a face is cut the same way everywhere: a square centred on the detector's
box, ``margin`` times its longer side (1.15 by default: the Kaggle set's tight crops plus a
little context), padded with the edge colour where it leaves the image. With ``align`` the face
is first rotated so the eyes are level (from the detector's landmarks); on upright faces that
gained nothing measurable, so it is off by default. A model version records its crop
(:class:`CropSpec`), and a worker crops for a version exactly as that version was trained.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from dataclasses import dataclass
from typing import Any
from typing import Literal

import numpy as np
from PIL import Image
from PIL import ImageOps

from face_emotions.faces.detection import Face

#: all: every face; largest: the largest face only; none: the whole image, no detection.
FacePolicy = Literal["all", "largest", "none"]
FACE_POLICIES: tuple[str, ...] = ("all", "largest", "none")
DEFAULT_MARGIN = 1.15


@dataclass(frozen=True)
class CropSpec:
    """How a model version's training images were made from photos."""

    #: ``detect``: the largest face of each training image, cropped; ``none``: whole images
    #: (a dataset of tight crops already, such as Kaggle's).
    faces: Literal["detect", "none"] = "none"
    margin: float = DEFAULT_MARGIN
    align: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> CropSpec:
        """A bundle's record; bundles from before crops were recorded are whole-image models."""
        if not data:
            return cls()
        return cls(
            faces="detect" if data.get("faces") == "detect" else "none",
            margin=float(data.get("margin", DEFAULT_MARGIN)),
            align=bool(data.get("align", False)),
        )


@dataclass(frozen=True)
class Region:
    """What is classified for one face (or for the whole image when there is no face)."""

    image: Image.Image
    face: Face | None  # None: the whole image

    def describe(self, index: int, size: tuple[int, int]) -> dict[str, Any]:
        """The face's record in results: box (original pixels), score, landmarks."""
        if self.face is None:
            return {
                "index": index,
                "box": [0, 0, size[0], size[1]],
                "score": None,
                "landmarks": None,
                "whole_image": True,
            }
        return {"index": index, **self.face.to_dict(), "whole_image": False}


def crop_face(image: Image.Image, face: Face, spec: CropSpec) -> Image.Image:
    """A square around ``face``, ``spec.margin`` times its longer side, edge-padded."""
    if spec.align and len(face.landmarks) >= 2:
        image, face = _levelled(image, face)
    x0, y0, x1, y1 = face.box
    side = max(x1 - x0, y1 - y0) * spec.margin
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    left, top = round(cx - side / 2), round(cy - side / 2)
    size = max(1, round(side))
    pad = max(0, -left, -top, left + size - image.width, top + size - image.height)
    if pad:
        image = ImageOps.expand(image, border=pad, fill=_edge_colour(image))
        left, top = left + pad, top + pad
    return image.crop((left, top, left + size, top + size))


def regions(
    image: Image.Image, faces: list[Face] | None, policy: str, spec: CropSpec
) -> list[Region]:
    """What to classify in ``image``: every face, the largest, or the whole image.

    ``faces`` None means detection did not run (policy ``none``); an empty list means it found
    nothing, and the whole image is classified (the result says no face was found).
    """
    if policy == "none" or not faces:
        return [Region(image, None)]
    chosen = faces[:1] if policy == "largest" else faces
    return [Region(crop_face(image, face, spec), face) for face in chosen]


def _levelled(image: Image.Image, face: Face) -> tuple[Image.Image, Face]:
    """Rotate about the face's centre so the eyes are level; the box keeps its size."""
    (lx, ly), (rx, ry) = face.landmarks[0], face.landmarks[1]
    angle = math.degrees(math.atan2(ry - ly, rx - lx))
    x0, y0, x1, y1 = face.box
    centre = ((x0 + x1) / 2, (y0 + y1) / 2)
    rotated = image.rotate(angle, resample=Image.Resampling.BILINEAR, center=centre)
    return rotated, face


def _edge_colour(image: Image.Image) -> tuple[int, ...]:
    """The mean colour of the border: padding that looks like the surroundings."""
    small = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BILINEAR))
    border = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    return tuple(int(v) for v in border.mean(axis=0).round())
