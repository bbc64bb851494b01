"""Face detection with MTCNN (the networks and weights of the ``facenet-pytorch`` package).

Why MTCNN: its weights (2 MB, MIT) ship inside a PyPI wheel and load with no network, it is
plain torch (CPU and the worker's GPU, batched over images of one size), it gives five
landmarks, and on real photos it finds exactly the faces there are (one on each single-face
photo, all six of a group photo, none on photos without a person). BlazeFace is faster but
needs a TFLite runtime and runs on the CPU only; OpenCV's Haar cascades give no landmarks and
fire on text. The package pins torch<2.3 and numpy<2 in its metadata, so ``make setup``
installs it with ``--no-deps`` (its code runs unchanged on this project's torch and numpy);
:mod:`face_emotions.faces.mtcnn` runs its three networks about twice as fast as its own loop.

Speed: detection runs on a copy whose longer side is at most ``max_side`` pixels (boxes are
scaled back to the original). MTCNN's cost grows with the square of that side: on one CPU core
a 640x480 photo takes about 12 ms at 320, 22 ms at 480 and 40 ms at 640 (README, "Faces").
At 320 the smallest face found is 1/16 of the photo's longer side (20 px of 320): every face
of the real-photo tests, including a six-person group photo, and faces that small hold little
expression anyway; crowd photos need a larger ``max_side``. Images smaller than the smallest
face it can find are not searched (MTCNN itself would crash on them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from typing import Protocol

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

#: The detector's own confidence below which a "face" is not one (hands, glasses, patterns
#: scored 0.86-0.87 on a group photo where every real face scored above 0.97).
DEFAULT_MIN_SCORE = 0.95
#: Smallest face side (pixels, on the downscaled copy) MTCNN looks for.
DEFAULT_MIN_FACE = 20
#: Longer side of the copy detection runs on (faces down to 1/16 of the photo's longer side).
DEFAULT_MAX_SIDE = 320


class DetectionSettings(Protocol):
    """The ``EMOTIONS_FACE_*`` settings (:class:`face_emotions.settings.Settings` has them)."""

    face_min_score: float
    face_min_size: int
    face_detect_max_side: int


class DetectorUnavailable(RuntimeError):
    """The detector's package is missing: a clear message instead of an ImportError."""


@dataclass(frozen=True)
class Face:
    """One detected face, in the original image's pixel coordinates (after EXIF rotation)."""

    box: tuple[float, float, float, float]  # x0, y0, x1, y1
    score: float
    landmarks: tuple[tuple[float, float], ...] = ()  # eyes, nose, mouth corners

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = self.box
        return max(x1 - x0, 0.0) * max(y1 - y0, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {
            "box": [round(v) for v in self.box],
            "score": round(self.score, 4),
            "landmarks": [[round(x, 1), round(y, 1)] for x, y in self.landmarks] or None,
        }


class FaceDetector:
    """MTCNN over downscaled copies. Inference only, so the decode threads of a worker share
    one detector (torch runs a module's forward from several threads safely)."""

    def __init__(
        self,
        *,
        device: str = "cpu",
        min_score: float = DEFAULT_MIN_SCORE,
        min_face: int = DEFAULT_MIN_FACE,
        max_side: int = DEFAULT_MAX_SIDE,
    ) -> None:
        try:
            from face_emotions.faces.mtcnn import Mtcnn

            self._mtcnn = Mtcnn(min_face=min_face, device=device)
        except ImportError as exc:
            raise DetectorUnavailable(
                "face detection needs the facenet-pytorch package (MTCNN weights): `make setup` "
                "installs it; by hand: pip install --no-deps facenet-pytorch==2.6.0"
            ) from exc
        self.device = device
        self.min_score = min_score
        self.min_face = min_face
        self.max_side = max_side

    @classmethod
    def from_settings(cls, settings: DetectionSettings, device: str = "cpu") -> FaceDetector:
        """The deployment's detector: workers, ``infer``, training and evaluation all build it
        here, so a training crop cache and the served crops come from the same settings."""
        return cls(
            device=device,
            min_score=settings.face_min_score,
            min_face=settings.face_min_size,
            max_side=settings.face_detect_max_side,
        )

    def detect(self, image: Image.Image) -> list[Face]:
        """Faces of one RGB image, largest first."""
        return self.detect_many([image])[0]

    def detect_many(self, images: Sequence[Image.Image]) -> list[list[Face]]:
        """Faces of each image, largest first; images of one (downscaled) size share a pass."""
        results: list[list[Face]] = [[] for _ in images]
        groups: dict[tuple[int, int], list[tuple[int, Image.Image, float]]] = {}
        for index, image in enumerate(images):
            if image.mode != "RGB":  # MTCNN takes three channels (grey or RGBA would crash it)
                image = image.convert("RGB")
            small, scale = self._downscaled(image)
            if min(small.size) < self.min_face:
                continue  # too small to hold a face MTCNN can find (and it would crash)
            groups.setdefault(small.size, []).append((index, small, scale))
        for members in groups.values():
            found = self._mtcnn.detect([small for _, small, _ in members])
            for (index, _, scale), (boxes, points) in zip(members, found, strict=True):
                results[index] = self._faces(boxes, points, scale)
        return results

    def _downscaled(self, image: Image.Image) -> tuple[Image.Image, float]:
        longest = max(image.size)
        if longest <= self.max_side:
            return image, 1.0
        scale = self.max_side / longest
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.BILINEAR), scale

    def _faces(self, boxes: np.ndarray, points: np.ndarray, scale: float) -> list[Face]:
        faces = []
        for box, landmarks in zip(boxes, points, strict=True):
            score = float(box[4])
            if score < self.min_score:
                continue
            x0, y0, x1, y1 = (float(v) / scale for v in box[:4])
            marks = tuple((float(x) / scale, float(y) / scale) for x, y in landmarks)
            faces.append(Face((x0, y0, x1, y1), score, marks))
        return sorted(faces, key=lambda face: face.area, reverse=True)
