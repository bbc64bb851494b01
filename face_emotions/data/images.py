"""The one image decoder used by both training and inference.

Training and serving must see the same pixels for the same file, otherwise the model is
evaluated on a distribution it never trained on (a transparent PNG composited onto black in
one path and white in the other is enough). Every entry point therefore goes through
:func:`decode_image`, which also turns every way a file can be bad into a single
:class:`ImageDecodeError`, so a batch job can record the failure per image and move on
instead of dying on an unexpected Pillow exception.
"""

from __future__ import annotations

import io
import os
import pathlib
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import BinaryIO
from typing import Final

import numpy as np
from PIL import Image
from PIL import ImageFile
from PIL import ImageOps
from PIL import UnidentifiedImageError

IMAGE_EXTENSIONS: Final[frozenset[str]] = frozenset(
    {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
)
DEFAULT_MAX_PIXELS: Final[int] = 40_000_000

_ALPHA_MODES: Final[frozenset[str]] = frozenset({"LA", "La", "PA", "RGBA", "RGBa"})
_UINT16_MODES: Final[frozenset[str]] = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_WHITE: Final[tuple[int, int, int, int]] = (255, 255, 255, 255)


class ImageDecodeError(ValueError):
    """Any reason an input could not become an RGB image.

    Carries ``path`` and ``reason`` separately so batch reports can group failures by reason
    while still pointing at the offending file.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageDecodeError], tuple[str, str]]:
        # The default pickling replays ``self.args`` (one message) into ``__init__``, which
        # would fail; errors must survive being sent between worker processes.
        return (type(self), (self.path, self.reason))


class ImageTooLargeError(ImageDecodeError):
    """A readable image that a preview refuses: decoding it would cost more than allowed."""


@dataclass(frozen=True)
class _Preview:
    """Reduced decoding for previews: at least ``size`` px per side, at most ``max_pixels``."""

    size: int
    max_pixels: int


def decode_image(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    path: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``source`` into a fully loaded RGB image, or raise :class:`ImageDecodeError`.

    ``path`` only labels errors (useful for bytes and streams). The pixel count is checked
    against ``max_pixels`` from the header before any pixel data is decompressed, without
    touching Pillow's process-wide ``MAX_IMAGE_PIXELS`` (other threads rely on it). An open
    file (``io.BufferedReader``) is decoded in place; other streams are read whole first.
    """
    return _decode(source, path, max_pixels, None)


def decode_preview(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    *,
    size: int,
    max_decoded_pixels: int,
    path: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Decode ``source`` for a preview about ``size`` px across, as cheaply as its codec allows.

    JPEG decodes at 1/2, 1/4 or 1/8 scale straight from its DCT coefficients (Pillow's
    ``draft``), keeping at least ``2 * size`` px per side for a clean downscale: a 6000 x 6000
    photo decodes as 750 x 750 in a tenth of the time. Other formats have no reduced decoding,
    so what would still be decoded is checked against ``max_decoded_pixels`` first and refused
    with :class:`ImageTooLargeError` instead of spending seconds of CPU. Never for model
    inputs: a reduced decode gives other pixels than :func:`decode_image`, which training and
    serving share.
    """
    return _decode(source, path, max_pixels, _Preview(size, max_decoded_pixels))


def _decode(
    source: str | os.PathLike[str] | bytes | BinaryIO,
    path: str | None,
    max_pixels: int,
    preview: _Preview | None,
) -> Image.Image:
    if isinstance(source, bytes | bytearray | memoryview):
        label = path if path is not None else "<bytes>"
        data = bytes(source)
        if not data:
            raise ImageDecodeError(label, "empty file")
        return _decode_stream(io.BytesIO(data), label, max_pixels, preview)

    if isinstance(source, str | os.PathLike):
        label = path if path is not None else os.fspath(source)
        with _open_file(source, label) as fh:
            return _decode_file(fh, label, max_pixels, preview)

    label = path if path is not None else _stream_name(source)
    if isinstance(source, io.BufferedReader) and source.seekable():
        return _decode_file(source, label, max_pixels, preview)
    try:
        data = source.read()
    except OSError as exc:
        raise ImageDecodeError(label, f"cannot read stream: {exc}") from exc
    if not isinstance(data, bytes | bytearray):
        raise TypeError(f"{label}: expected a binary stream, got {type(data).__name__} data")
    if not data:
        raise ImageDecodeError(label, "empty file")
    return _decode_stream(io.BytesIO(data), label, max_pixels, preview)


def _decode_file(
    fh: io.BufferedReader, label: str, max_pixels: int, preview: _Preview | None
) -> Image.Image:
    """An open local file, decoded in place (no copy into memory)."""
    try:
        empty = not fh.peek(1)
    except OSError as exc:
        raise ImageDecodeError(label, f"cannot read file: {exc.strerror or exc}") from exc
    if empty:
        raise ImageDecodeError(label, "empty file")
    return _decode_stream(fh, label, max_pixels, preview)


def load_batch_array(images: Sequence[Image.Image], size: int) -> np.ndarray:
    """Resize decoded images and stack them into one uint8 NHWC array of shape (N, S, S, 3).

    Resizing is the only per-image step so that training and inference share exactly the
    same resampling; normalisation belongs to the model and is done on the whole batch.
    """
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive int, got {size!r}")
    for index, image in enumerate(images):
        if image.mode != "RGB":
            raise ValueError(
                f"image {index} has mode {image.mode!r}; decode it with decode_image() first"
            )
    if not images:
        return np.empty((0, size, size, 3), dtype=np.uint8)
    resized = [image.resize((size, size), Image.Resampling.BILINEAR) for image in images]
    return np.stack([np.asarray(image, dtype=np.uint8) for image in resized])


def iter_image_files(root: str | os.PathLike[str], *, recursive: bool = True) -> list[pathlib.Path]:
    """List image files under ``root`` in a deterministic (sorted) order.

    Hidden entries (editor/OS droppings such as ``.DS_Store`` or ``.ipynb_checkpoints``) are
    skipped, and symlinked directories are never followed so a link loop or a link to a huge
    tree cannot make a scan hang or silently duplicate data.
    """
    top = pathlib.Path(root)
    if not top.exists():
        raise FileNotFoundError(f"{top}: directory not found")
    if not top.is_dir():
        raise NotADirectoryError(f"{top}: not a directory")

    found: list[pathlib.Path] = []
    pending = [top]
    while pending:
        directory = pending.pop()
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.name.startswith("."):
                    continue
                if entry.is_dir(follow_symlinks=False):
                    if recursive:
                        pending.append(directory / entry.name)
                elif entry.is_file() and _has_image_suffix(entry.name):
                    found.append(directory / entry.name)
    return sorted(found, key=lambda item: item.parts)


def _has_image_suffix(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _stream_name(stream: object) -> str:
    name = getattr(stream, "name", None)
    return name if isinstance(name, str) and name else "<stream>"


def _open_file(source: str | os.PathLike[str], label: str) -> io.BufferedReader:
    """Open for reading, translating OS errors into reasons an operator can act on."""
    try:
        return open(source, "rb")
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ImageDecodeError(label, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageDecodeError(label, "is a directory, not a file") from exc
    except PermissionError as exc:
        raise ImageDecodeError(label, "permission denied") from exc
    except OSError as exc:
        raise ImageDecodeError(label, f"cannot read file: {exc.strerror or exc}") from exc


def _decode_stream(
    fp: BinaryIO, label: str, max_pixels: int, preview: _Preview | None = None
) -> Image.Image:
    image = _open_header(fp, label, max_pixels)
    with image:
        _check_pixels(image.size, max_pixels, label)
        if preview is not None:
            _reduce_for_preview(image, preview, label)
        try:
            image.load()  # the first frame only, for animated GIF/WEBP/TIFF
            oriented = ImageOps.exif_transpose(image)
        except Image.DecompressionBombError as exc:
            raise ImageDecodeError(label, f"image is over the pixel limit: {exc}") from exc
        except Exception as exc:
            # Pillow and its codecs raise OSError, SyntaxError, ValueError, EOFError,
            # struct.error, zlib.error... for damaged data; the caller needs only one type.
            raise ImageDecodeError(label, f"truncated or corrupt image data: {exc}") from exc
    try:
        return _to_rgb(oriented)
    except Exception as exc:
        raise ImageDecodeError(label, f"unsupported color mode {oriented.mode!r}: {exc}") from exc


def _reduce_for_preview(image: ImageFile.ImageFile, preview: _Preview, label: str) -> None:
    """Ask the codec for its cheapest scale that still gives a clean ``preview.size`` image
    (a no-op for formats without reduced decoding), then refuse what would still cost too much.
    """
    try:
        image.draft(None, (2 * preview.size, 2 * preview.size))
    except Exception as exc:
        raise ImageDecodeError(label, f"truncated or corrupt image data: {exc}") from exc
    width, height = image.size
    if width * height > preview.max_pixels:
        raise ImageTooLargeError(
            label,
            f"image has {width} x {height} = {width * height} pixels to decode, over the "
            f"preview limit of {preview.max_pixels}",
        )


def _open_header(fp: BinaryIO, label: str, max_pixels: int) -> ImageFile.ImageFile:
    """Identify the format and read only the header (Pillow opens lazily)."""
    try:
        return Image.open(fp)
    except UnidentifiedImageError as exc:
        raise ImageDecodeError(label, "not an image (cannot identify format)") from exc
    except Image.DecompressionBombError as exc:
        # Pillow's own global limit fired first; re-read the header so the error names the
        # real dimensions, and so a caller who allows more than Pillow does is honoured.
        image = _open_header_unchecked(fp)
        if image is None:
            raise ImageDecodeError(label, f"image is over the pixel limit: {exc}") from exc
        _check_pixels(image.size, max_pixels, label)
        return image
    except Exception as exc:
        raise ImageDecodeError(label, f"truncated or corrupt image data: {exc}") from exc


def _open_header_unchecked(fp: BinaryIO) -> ImageFile.ImageFile | None:
    """Mirror ``Image.open``'s format probing, minus its global decompression-bomb check."""
    try:
        Image.init()
        fp.seek(0)
        prefix = fp.read(16)
        for format_id in Image.ID:
            factory, accept = Image.OPEN[format_id]
            accepted = True if accept is None else accept(prefix)
            if isinstance(accepted, str) or not accepted:
                continue  # a str is Pillow's "recognised but unsupported" message
            fp.seek(0)
            try:
                return factory(fp, "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue
    except Exception:
        return None
    return None


def _check_pixels(size: tuple[int, int], max_pixels: int, label: str) -> None:
    width, height = size
    pixels = width * height
    if pixels > max_pixels:
        raise ImageDecodeError(
            label,
            f"image has {width} x {height} = {pixels} pixels, over the limit of {max_pixels}",
        )


def _to_rgb(image: Image.Image) -> Image.Image:
    """Normalise any Pillow mode to 8-bit RGB.

    Transparency is composited onto white because faces cut out of a background are
    normally shown on white; compositing onto black (Pillow's plain ``convert``) would
    create a dark frame the model never saw in training. High bit-depth grayscale is
    rescaled rather than clipped, which would turn most of a 16-bit image pure white.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _UINT16_MODES or mode in {"I", "F"}:
        return _gray_array_to_rgb(image)
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE)
        background.alpha_composite(rgba)
        return background.convert("RGB")
    return image.convert("RGB")


def _gray_array_to_rgb(image: Image.Image) -> Image.Image:
    """Scale 16-bit, 32-bit integer and float grayscale to 8 bits.

    16-bit data (and "I" data that fits in 0..65535, which is how Pillow represents 16-bit
    PGM/PNG/TIFF after some conversions) maps 0..65535 linearly onto 0..255. Float data in
    0..1 is scaled by 255, float data already in 0..255 is kept; anything else (negative or
    wider-range values) is min-max stretched, because it has no agreed white point.
    """
    values = np.asarray(image)
    mode = image.mode
    if mode == "F":
        gray = _float_to_uint8(values.astype(np.float64))
    else:
        wide = values.astype(np.int64)
        if mode in _UINT16_MODES or (wide.size and wide.min() >= 0 and wide.max() <= 0xFFFF):
            gray = ((wide * 255 + 0x7FFF) // 0xFFFF).astype(np.uint8)
        else:
            gray = _stretch(wide.astype(np.float64))
        transparent = image.info.get("transparency")
        if isinstance(transparent, int):
            gray[values == transparent] = 255
    return Image.fromarray(gray).convert("RGB")


def _float_to_uint8(values: np.ndarray) -> np.ndarray:
    finite = np.isfinite(values)
    values = np.where(finite, values, 0.0)
    if not values.size:
        return values.astype(np.uint8)
    low, high = float(values.min()), float(values.max())
    if low >= 0.0 and high <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    if low >= 0.0 and high <= 255.0:
        return np.rint(values).astype(np.uint8)
    return _stretch(values)


def _stretch(values: np.ndarray) -> np.ndarray:
    low, high = float(values.min()), float(values.max())
    if high <= low:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.rint((values - low) * (255.0 / (high - low))).astype(np.uint8)
