"""Procedural cartoon faces with a known expression, for demos and tests.

The project needs a dataset that a freshly written pipeline can train on end to end without
downloading anything, and that gives a *meaningful* signal: a small CNN should learn it well,
but no shortcut (a single pixel, the image size, the file format, the colour mode) should give
the class away. So the class only decides the facial features (brows, eyes, mouth), each with
its own jitter, while everything else -- skin tone, hair, head pose, scale, background,
lighting, noise, colour mode, output size and file format -- is drawn independently of the
class.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
from PIL import Image
from rich.console import Console
from rich.progress import BarColumn
from rich.progress import MofNCompleteColumn
from rich.progress import Progress
from rich.progress import TextColumn
from rich.progress import TimeRemainingColumn

from face_emotions.data.face_drawing import CANVAS
from face_emotions.data.face_drawing import EXPRESSIONS
from face_emotions.data.face_drawing import draw_background
from face_emotions.data.face_drawing import draw_face_layer
from face_emotions.data.face_drawing import unit_grid
from face_emotions.labels import EMOTIONS

MIN_SIZE = 48
MAX_SIZE = 224
GRAYSCALE_PROBABILITY = 0.3


# Only generated files look like this; anything else in a class folder is left alone.
_GENERATED_NAME = re.compile(r"^\d+\.(png|jpg)$")


def render_face(emotion: str, rng: np.random.Generator, size: int | None = None) -> Image.Image:
    """Render one face showing ``emotion``.

    Everything not tied to the emotion is drawn from ``rng`` too, so a seeded generator makes
    the image reproducible. The result is square, ``size`` pixels wide (drawn from
    48..224 when ``None``, so loaders must cope with mixed sizes), and grayscale ("L") about
    30% of the time, otherwise "RGB", so pipelines see both modes.
    """
    if emotion not in EXPRESSIONS:
        raise ValueError(f"unknown emotion {emotion!r}; expected one of {EMOTIONS}")
    if size is None:
        size = int(rng.integers(MIN_SIZE, MAX_SIZE + 1))
    if size < 1:
        raise ValueError(f"size must be positive, got {size}")

    background = draw_background(rng)
    face = draw_face_layer(emotion, rng)
    angle = rng.uniform(-15.0, 15.0)
    shift = rng.uniform(-0.06, 0.06, 2) * CANVAS
    # Nearest-neighbour rotation is ~6x cheaper than bilinear, and the area-averaging resize
    # below smooths its steps just as it smooths ImageDraw's own aliased edges.
    face = face.rotate(
        angle,
        resample=Image.Resampling.NEAREST,
        # Pillow annotates ``translate`` as ints, but the affine matrix takes sub-pixel floats.
        translate=(float(shift[0]), float(shift[1])),  # type: ignore[arg-type]
    )
    background.paste(face, (0, 0), face)
    image = background.resize((size, size), Image.Resampling.HAMMING)

    # Lighting and sensor noise are applied at the output resolution: it is cheaper, and real
    # noise lives at the pixel scale the model actually sees. Grayscale is decided first so the
    # float work runs on one channel when it can.
    grayscale = bool(rng.random() < GRAYSCALE_PROBABILITY)
    if grayscale:
        image = image.convert("L")
    pixels = np.asarray(image, dtype=np.float32)
    xs, ys = unit_grid(size)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    light = 1.0 + rng.uniform(0.0, 0.35) * (np.cos(theta) * xs + np.sin(theta) * ys)
    light *= rng.uniform(0.8, 1.15)
    sigma = rng.uniform(0.0, 12.0)
    # Luminance noise shared by all channels: a third of the cost of per-channel noise.
    noise = rng.standard_normal((size, size), dtype=np.float32) * sigma
    if not grayscale:
        light = light[..., None]
        noise = noise[..., None]
    pixels = pixels * light + noise
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "L" if grayscale else "RGB")


def write_sample_dataset(
    out_dir: str | Path,
    per_class: int,
    seed: int = 0,
    *,
    progress: bool = True,
    jpeg_fraction: float = 0.3,
) -> dict[str, int]:
    """Write ``per_class`` faces per emotion as ``out_dir/<Class>/<n>.png|jpg``.

    Each file gets its own generator seeded from ``(seed, class index, n)``, so the output is
    byte-for-byte reproducible and file ``n`` does not depend on how many files came before
    it. Mixing PNG and JPEG exercises both decoders and JPEG artefacts. Re-running overwrites;
    generated files (``<digits>.png|jpg``) left over from an earlier, larger or differently
    formatted run are removed so that each folder holds exactly what the returned counts say.
    """
    if per_class < 0:
        raise ValueError(f"per_class must be >= 0, got {per_class}")
    if not 0.0 <= jpeg_fraction <= 1.0:
        raise ValueError(f"jpeg_fraction must be in [0, 1], got {jpeg_fraction}")
    root = Path(out_dir)
    counts: dict[str, int] = {}
    bar = Progress(
        TextColumn("[bold]sample faces"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
        disable=not progress,
    )
    with bar:
        task = bar.add_task("faces", total=per_class * len(EMOTIONS))
        for class_index, emotion in enumerate(EMOTIONS):
            class_dir = root / emotion
            class_dir.mkdir(parents=True, exist_ok=True)
            written: set[str] = set()
            for n in range(per_class):
                rng = np.random.default_rng([seed, class_index, n])
                as_jpeg = bool(rng.random() < jpeg_fraction)
                quality = int(rng.integers(70, 96))
                image = render_face(emotion, rng)
                if as_jpeg:
                    name = f"{n}.jpg"
                    image.save(class_dir / name, format="JPEG", quality=quality)
                else:
                    name = f"{n}.png"
                    image.save(class_dir / name, format="PNG")
                written.add(name)
                bar.advance(task)
            for stale in class_dir.iterdir():
                if _GENERATED_NAME.match(stale.name) and stale.name not in written:
                    stale.unlink()
            counts[emotion] = per_class
    return counts
