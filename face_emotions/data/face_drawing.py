"""Drawing one cartoon face: the expression prototypes and the primitives that draw them.

Only the brows, eyes and mouth depend on the class (:data:`EXPRESSIONS`); skin, hair, pose and
background are drawn independently of it, so a model must read the expression to learn the
class. :mod:`face_emotions.data.sample_faces` composes these layers into finished images.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image
from PIL import ImageDraw

# Drawing happens on a fixed canvas and is then resized: ImageDraw does not antialias, so a
# larger canvas plus a resampling filter gives smooth edges at every output size.
CANVAS = 256


@dataclass(frozen=True)
class _Expression:
    """Prototype feature values of one class; all lengths are in units of the face half-width.

    Brow heights are measured upwards from the eye centre at the brow's inner (near the nose)
    and outer end; ``arch`` bends the brow upwards in its middle. ``eye_open`` is the eye's
    height-to-width ratio. The mouth is described by its kind plus half-width, a curve depth
    (positive: centre lower than the corners, i.e. a smile) and an opening half-height.
    """

    brow_inner: float
    brow_outer: float
    brow_arch: float
    brow_thick: float
    eye_open: float
    lid: str  # "none", "inner" (angry slant), "outer" (sad droop), "smile" (cheeks push up)
    mouth: str  # "line", "smile", "o", "stretch", "teeth"
    mouth_w: float
    mouth_depth: float
    mouth_open: float


_NEUTRAL = _Expression(0.24, 0.24, 0.04, 0.065, 0.55, "none", "line", 0.26, 0.0, 0.0)

EXPRESSIONS: dict[str, _Expression] = {
    "Angry": _Expression(0.06, 0.28, -0.02, 0.085, 0.33, "inner", "line", 0.24, -0.03, 0.0),
    "Fear": _Expression(0.44, 0.30, 0.03, 0.06, 0.90, "none", "stretch", 0.33, -0.02, 0.12),
    "Happy": _Expression(0.24, 0.24, 0.06, 0.065, 0.42, "smile", "smile", 0.34, 0.17, 0.0),
    "Sad": _Expression(0.36, 0.12, 0.0, 0.065, 0.50, "outer", "line", 0.25, -0.13, 0.0),
    "Surprised": _Expression(0.42, 0.40, 0.14, 0.06, 1.0, "none", "o", 0.12, 0.0, 0.18),
}


def _jitter(rng: np.random.Generator, value: float, spread: float) -> float:
    return float(value + rng.uniform(-spread, spread))


def _towards(neutral: float, target: float, intensity: float) -> float:
    """Weaker expressions sit between neutral and the prototype, like real faces do."""
    return neutral + (target - neutral) * intensity


def _skin_colour(rng: np.random.Generator) -> np.ndarray:
    # Interpolate between a light and a dark tone so every skin shade is possible in every class.
    light = np.array([250.0, 222.0, 196.0])
    dark = np.array([88.0, 55.0, 36.0])
    t = rng.uniform(0.0, 1.0)
    return np.clip(light + (dark - light) * t + rng.normal(0.0, 8.0, 3), 0, 255)


def _hair_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    palette = np.array(
        [[25, 20, 18], [60, 40, 25], [110, 75, 40], [180, 140, 80], [150, 60, 30], [120, 120, 120]],
        dtype=float,
    )
    colour = palette[rng.integers(len(palette))] + rng.normal(0.0, 10.0, 3)
    return _rgb(colour)


def _rgb(values: np.ndarray | list[float]) -> tuple[int, int, int]:
    arr = np.clip(np.asarray(values, dtype=float), 0, 255)
    return int(arr[0]), int(arr[1]), int(arr[2])


@lru_cache(maxsize=256)  # one grid per output size (48..224 px) and the background
def unit_grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in [-1, 1]; cached because every image at a given size needs the same grid."""
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    return np.meshgrid(axis, axis)


def draw_background(rng: np.random.Generator) -> Image.Image:
    # A two-colour linear gradient plus a few soft blobs, so the background is never a constant
    # that a model could subtract away, and never correlated with the class.
    xs, ys = unit_grid(64)
    theta = rng.uniform(0.0, 2.0 * math.pi)
    t = (np.cos(theta) * xs + np.sin(theta) * ys + 1.0) / 2.0
    c1 = rng.uniform(0, 255, 3)
    c2 = np.clip(c1 + rng.normal(0.0, 70.0, 3), 0, 255)
    small = c1 + t[..., None] * (c2 - c1)
    image = Image.fromarray(small.astype(np.uint8), "RGB").resize(
        (CANVAS, CANVAS), Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        x, y = rng.uniform(0, CANVAS, 2)
        r = rng.uniform(15, 60)
        colour = np.clip((c1 + c2) / 2 + rng.normal(0.0, 45.0, 3), 0, 255)
        draw.ellipse((x - r, y - r, x + r, y + r), fill=_rgb(colour))
    return image


def _quadratic(
    p0: tuple[float, float], p1: tuple[float, float], bend: float, n: int = 9
) -> list[tuple[float, float]]:
    """Points on a curve from p0 to p1 whose middle is lifted by ``bend`` pixels (y is down)."""
    pts = []
    for i in range(n):
        s = i / (n - 1)
        x = p0[0] + (p1[0] - p0[0]) * s
        y = p0[1] + (p1[1] - p0[1]) * s - bend * 4.0 * s * (1.0 - s)
        pts.append((x, y))
    return pts


def _draw_eye(
    draw: ImageDraw.ImageDraw,
    cx: float,
    cy: float,
    a: float,
    b: float,
    side: int,
    lid: str,
    lid_amount: float,
    skin: tuple[int, int, int],
    iris: tuple[int, int, int],
    gaze: tuple[float, float],
) -> None:
    """Draw one eye; ``side`` is -1 for the image-left eye, +1 for the right (inner is -side)."""
    draw.ellipse((cx - a, cy - b, cx + a, cy + b), fill=(245, 245, 240), outline=(40, 30, 30))
    ir = min(a * 0.45, b * 0.95)
    ix = cx + gaze[0] * (a - ir) * 0.6
    iy = cy + gaze[1] * max(b - ir, 0.0) * 0.6
    ir_y = min(ir, b * 0.95)
    draw.ellipse((ix - ir, iy - ir_y, ix + ir, iy + ir_y), fill=iris)
    pr = ir * 0.45
    draw.ellipse((ix - pr, iy - pr * ir_y / ir, ix + pr, iy + pr * ir_y / ir), fill=(10, 10, 10))
    inner_x = cx - side * a
    outer_x = cx + side * a
    top = cy - b
    if lid == "inner":
        # A heavy lid slanting down towards the nose: the classic frown.
        drop = 2.0 * b * lid_amount
        poly = [
            (inner_x - side * 2, top - 3),
            (outer_x + side * 2, top - 3),
            (outer_x + side * 2, top + 0.15 * b),
            (inner_x - side * 2, top + drop),
        ]
        draw.polygon(poly, fill=skin)
        draw.line([poly[3], poly[2]], fill=(40, 30, 30), width=max(2, int(a * 0.12)))
    elif lid == "outer":
        # Drooping outer corner reads as sadness.
        drop = 1.6 * b * lid_amount
        poly = [
            (inner_x - side * 2, top - 3),
            (outer_x + side * 2, top - 3),
            (outer_x + side * 2, top + drop),
            (inner_x - side * 2, top + 0.1 * b),
        ]
        draw.polygon(poly, fill=skin)
        draw.line([poly[3], poly[2]], fill=(40, 30, 30), width=max(2, int(a * 0.1)))
    elif lid == "smile":
        # Cheeks push the lower lid up, leaving an upward-curved crescent.
        lift = b * (0.9 + 0.6 * lid_amount)
        draw.ellipse(
            (cx - 1.4 * a, cy + b - lift, cx + 1.4 * a, cy + b - lift + 3.0 * b), fill=skin
        )
        draw.arc(
            (cx - 1.05 * a, cy + b - lift, cx + 1.05 * a, cy + b - lift + 2.0 * b),
            start=200,
            end=340,
            fill=(40, 30, 30),
            width=max(2, int(a * 0.1)),
        )


def _draw_mouth(
    draw: ImageDraw.ImageDraw,
    rng: np.random.Generator,
    kind: str,
    mx: float,
    my: float,
    w: float,
    depth: float,
    opening: float,
    lips: tuple[int, int, int],
    thick: int,
) -> None:
    """Draw the mouth; ``kind`` picks the shape because expressions differ in topology, not
    just in a curve parameter (an "O" cannot be reached by bending a line)."""
    dark = (60, 15, 20)
    teeth = (240, 238, 225)
    n = 11
    xs = np.linspace(-1.0, 1.0, n)
    if kind == "line" or (kind == "smile" and rng.random() < 0.4):
        ys = my + depth * (1.0 - xs**2) - depth * 0.5
        draw.line(list(zip(mx + w * xs, ys, strict=True)), fill=lips, width=thick, joint="curve")
        return
    if kind == "smile":
        # Open smile: a flat-ish upper lip over a deep lower curve, showing the upper teeth.
        upper = my - depth * 0.4 + 0.25 * depth * (1.0 - xs**2)
        lower = my - depth * 0.4 + 1.35 * depth * (1.0 - xs**2)
        poly = list(zip(mx + w * xs, upper, strict=True))
        poly += list(zip(mx + w * xs[::-1], lower[::-1], strict=True))
        draw.polygon(poly, fill=dark)
        band = upper + 0.35 * (lower - upper)
        tpoly = list(zip(mx + w * xs, upper, strict=True))
        tpoly += list(zip(mx + w * xs[::-1], band[::-1], strict=True))
        draw.polygon(tpoly, fill=teeth)
        draw.line([*poly, poly[0]], fill=lips, width=max(2, thick // 2), joint="curve")
        return
    if kind == "o":
        h = opening
        draw.ellipse((mx - w, my - h, mx + w, my + h), fill=dark, outline=lips, width=thick)
        return
    if kind == "stretch":
        # Fear: a wide, shallow opening pulled sideways, both rows of teeth showing.
        h = opening
        upper = my - h * (1.0 - xs**4) + depth * (1.0 - xs**2)
        lower = my + h * (1.0 - xs**4) + depth * (1.0 - xs**2)
        poly = list(zip(mx + w * xs, upper, strict=True))
        poly += list(zip(mx + w * xs[::-1], lower[::-1], strict=True))
        draw.polygon(poly, fill=dark)
        top_band = upper + 0.3 * (lower - upper)
        bottom_band = lower - 0.25 * (lower - upper)
        draw.polygon(
            list(zip(mx + w * xs, upper, strict=True))
            + list(zip(mx + w * xs[::-1], top_band[::-1], strict=True)),
            fill=teeth,
        )
        draw.polygon(
            list(zip(mx + w * xs, bottom_band, strict=True))
            + list(zip(mx + w * xs[::-1], lower[::-1], strict=True)),
            fill=teeth,
        )
        draw.line([*poly, poly[0]], fill=lips, width=max(2, thick // 2), joint="curve")
        return
    if kind == "teeth":
        # Angry, bared: clenched teeth in a flat box with a grid of tooth gaps.
        h = opening
        draw.rounded_rectangle(
            (mx - w, my - h, mx + w, my + h),
            radius=h * 0.6,
            fill=teeth,
            outline=lips,
            width=max(2, thick // 2),
        )
        draw.line([(mx - w, my), (mx + w, my)], fill=(120, 110, 100), width=max(1, thick // 4))
        for k in range(1, 6):
            x = mx - w + 2.0 * w * k / 6.0
            draw.line([(x, my - h), (x, my + h)], fill=(120, 110, 100), width=max(1, thick // 4))
        return
    raise ValueError(f"unknown mouth kind {kind!r}")


def draw_face_layer(emotion: str, rng: np.random.Generator) -> Image.Image:
    """Draw head, hair, neck and features centred on a transparent canvas."""
    proto = EXPRESSIONS[emotion]
    intensity = rng.uniform(0.75, 1.1)

    def feature(name: str, spread: float) -> float:
        value = _towards(getattr(_NEUTRAL, name), getattr(proto, name), intensity)
        return _jitter(rng, value, spread)

    layer = Image.new("RGBA", (CANVAS, CANVAS), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)

    scale = rng.uniform(0.8, 1.0)
    rx = CANVAS * 0.32 * scale
    ry = rx * rng.uniform(1.15, 1.35)
    cx = cy = CANVAS / 2.0
    skin_arr = _skin_colour(rng)
    skin = _rgb(skin_arr)
    hair = _hair_colour(rng)
    shade = _rgb(skin_arr * 0.8)

    # Neck and shoulders first so the head overlaps them.
    shirt = _rgb(rng.uniform(0, 255, 3))
    draw.ellipse((cx - rx * 1.9, cy + ry * 1.05, cx + rx * 1.9, cy + ry * 2.6), fill=shirt)
    draw.rectangle((cx - rx * 0.4, cy + ry * 0.5, cx + rx * 0.4, cy + ry * 1.25), fill=shade)

    hair_style = int(rng.integers(0, 3))
    if hair_style == 1:  # long hair behind the head
        draw.rounded_rectangle(
            (cx - rx * 1.15, cy - ry * 1.1, cx + rx * 1.15, cy + ry * rng.uniform(0.4, 1.1)),
            radius=rx * 0.6,
            fill=hair,
        )
    # Ears.
    for side in (-1, 1):
        ex = cx + side * rx * 0.98
        draw.ellipse((ex - rx * 0.14, cy - ry * 0.2, ex + rx * 0.14, cy + ry * 0.15), fill=shade)
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=skin)
    if hair_style != 2:  # a cap of hair on top; style 2 is bald
        hair_line = rng.uniform(0.55, 0.75)
        draw.chord(
            (cx - rx * 1.04, cy - ry * 1.08, cx + rx * 1.04, cy + ry * (2 * hair_line - 1.08)),
            start=180,
            end=360,
            fill=hair,
        )

    u = rx
    eye_y = cy - ry * rng.uniform(0.02, 0.12)
    eye_dx = u * rng.uniform(0.36, 0.44)
    eye_a = u * rng.uniform(0.16, 0.19)
    eye_open = max(0.12, feature("eye_open", 0.07))
    eye_b = eye_a * eye_open
    iris = _rgb(
        np.array([[70, 45, 25], [40, 90, 150], [60, 110, 60], [30, 25, 20]], dtype=float)[
            rng.integers(4)
        ]
    )
    gaze = (rng.uniform(-1, 1), rng.uniform(-1, 1))
    lid_amount = rng.uniform(0.7, 1.0) * min(intensity, 1.0)

    brow_inner = feature("brow_inner", 0.035)
    brow_outer = feature("brow_outer", 0.035)
    brow_arch = feature("brow_arch", 0.02)
    brow_thick = max(3, int(u * feature("brow_thick", 0.012)))
    brow = _rgb(np.asarray(hair, dtype=float) * 0.6)
    brow_in_x = u * rng.uniform(0.10, 0.16)
    brow_out_x = eye_dx + eye_a * rng.uniform(1.0, 1.3)

    for side in (-1, 1):
        ex = cx + side * eye_dx
        _draw_eye(draw, ex, eye_y, eye_a, eye_b, side, proto.lid, lid_amount, skin, iris, gaze)
        # Brow heights are measured from the eye centre; negative heights are not allowed.
        p_in = (cx + side * brow_in_x, eye_y - u * max(brow_inner, 0.02) - eye_b * 0.3)
        p_out = (cx + side * brow_out_x, eye_y - u * max(brow_outer, 0.02) - eye_b * 0.3)
        draw.line(
            _quadratic(p_in, p_out, u * brow_arch), fill=brow, width=brow_thick, joint="curve"
        )

    # Nose: a soft shadow line; it carries no class information but gives faces structure.
    nose_y = cy + ry * rng.uniform(0.2, 0.3)
    nose_w = u * rng.uniform(0.08, 0.13)
    draw.line(
        [(cx, eye_y + eye_a * 0.5), (cx - nose_w * 0.3, nose_y), (cx + nose_w, nose_y)],
        fill=shade,
        width=max(2, int(u * 0.04)),
        joint="curve",
    )

    mouth_kind = proto.mouth
    mouth_w = u * feature("mouth_w", 0.04)
    mouth_depth = u * feature("mouth_depth", 0.03)
    mouth_open = u * feature("mouth_open", 0.025)
    if emotion == "Angry" and rng.random() < 0.4:
        mouth_kind = "teeth"
        mouth_open = u * rng.uniform(0.05, 0.08)
        mouth_depth = 0.0
    my = cy + ry * rng.uniform(0.5, 0.58)
    # Lips are always clearly darker than the skin so the mouth survives grayscale and 48 px.
    lips = _rgb(skin_arr * np.array([0.55, 0.3, 0.3]) + np.array([30.0, 0.0, 0.0]))
    thick = max(3, int(u * rng.uniform(0.06, 0.09)))
    _draw_mouth(draw, rng, mouth_kind, cx, my, mouth_w, mouth_depth, mouth_open, lips, thick)
    return layer
