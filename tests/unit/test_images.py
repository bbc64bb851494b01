"""The shared decoder: every image kind becomes RGB, every bad input becomes ImageDecodeError."""

from __future__ import annotations

import io
import os
import pickle
import random
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from face_emotions.data.images import DEFAULT_MAX_PIXELS
from face_emotions.data.images import IMAGE_EXTENSIONS
from face_emotions.data.images import ImageDecodeError
from face_emotions.data.images import decode_image
from face_emotions.data.images import iter_image_files
from face_emotions.data.images import load_batch_array

W, H = 24, 16


def _save(image: Image.Image, path: Path, **params: object) -> Path:
    image.save(path, **params)
    return path


def _noise(size: tuple[int, int] = (64, 64), seed: int = 0) -> Image.Image:
    """Incompressible pixels, so a file cut in half really loses image data."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    crc = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", crc)


def _png_with_header(width: int, height: int) -> bytes:
    """A valid-looking 8-bit grayscale PNG whose IHDR claims any size: a bomb's header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def _assert_rgb(image: Image.Image, size: tuple[int, int] = (W, H)) -> np.ndarray:
    assert image.mode == "RGB"
    assert image.size == size
    pixels = np.asarray(image)
    assert pixels.dtype == np.uint8
    assert pixels.shape == (size[1], size[0], 3)
    return pixels


# ---------------------------------------------------------------------------- good inputs


def test_extensions_constant() -> None:
    assert {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"} == IMAGE_EXTENSIONS
    assert isinstance(IMAGE_EXTENSIONS, frozenset)
    assert DEFAULT_MAX_PIXELS == 40_000_000


def test_rgb_png_round_trips_exactly(tmp_path: Path) -> None:
    source = _noise((W, H))
    image = decode_image(_save(source, tmp_path / "rgb.png"))
    assert np.array_equal(_assert_rgb(image), np.asarray(source))


def test_grayscale(tmp_path: Path) -> None:
    path = _save(Image.new("L", (W, H), 77), tmp_path / "gray.png")
    pixels = _assert_rgb(decode_image(path))
    assert (pixels == 77).all()


def test_bilevel(tmp_path: Path) -> None:
    path = _save(Image.new("1", (W, H), 1), tmp_path / "bw.bmp")
    assert (_assert_rgb(decode_image(path)) == 255).all()


def test_rgba_transparent_pixel_becomes_white(tmp_path: Path) -> None:
    image = Image.new("RGBA", (W, H), (200, 10, 10, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))  # fully transparent *black*
    image.putpixel((1, 0), (0, 0, 0, 128))  # half-transparent black -> mid grey
    pixels = _assert_rgb(decode_image(_save(image, tmp_path / "rgba.png")))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert all(abs(int(c) - 127) <= 2 for c in pixels[0, 1])
    assert tuple(pixels[5, 5]) == (200, 10, 10)


def test_la_transparent_pixel_becomes_white(tmp_path: Path) -> None:
    image = Image.new("LA", (W, H), (40, 255))
    image.putpixel((2, 3), (0, 0))
    pixels = _assert_rgb(decode_image(_save(image, tmp_path / "la.png")))
    assert tuple(pixels[3, 2]) == (255, 255, 255)
    assert tuple(pixels[0, 0]) == (40, 40, 40)


def test_palette_with_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (W, H), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    image.putpixel((0, 0), 0)
    path = _save(image, tmp_path / "pal.png", transparency=0)
    pixels = _assert_rgb(decode_image(path))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[1, 1]) == (10, 200, 30)


def test_palette_without_transparency(tmp_path: Path) -> None:
    image = Image.new("P", (W, H), 1)
    image.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pixels = _assert_rgb(decode_image(_save(image, tmp_path / "pal.bmp")))
    assert tuple(pixels[0, 0]) == (10, 200, 30)


def test_cmyk_jpeg(tmp_path: Path) -> None:
    path = _save(Image.new("CMYK", (W, H), (0, 255, 255, 0)), tmp_path / "cmyk.jpg", quality=95)
    with Image.open(path) as raw:
        assert raw.mode == "CMYK"
    pixels = _assert_rgb(decode_image(path)).astype(int)
    red, green, blue = pixels[..., 0].mean(), pixels[..., 1].mean(), pixels[..., 2].mean()
    assert red > 200 and green < 60 and blue < 60


def test_16bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.full((H, W), 32768, dtype=np.uint16)
    values[0, 0], values[0, 1] = 0, 65535
    path = _save(Image.fromarray(values), tmp_path / "deep.png")
    with Image.open(path) as raw:
        assert raw.mode in {"I;16", "I"}
    pixels = _assert_rgb(decode_image(path)).astype(int)
    assert abs(pixels[5, 5, 0] - 128) <= 1
    assert tuple(pixels[0, 0]) == (0, 0, 0)
    assert tuple(pixels[0, 1]) == (255, 255, 255)


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    path = _save(Image.new("I;16B", (W, H), 65535 // 4), tmp_path / "deep_be.tiff")
    with Image.open(path) as raw:
        assert raw.mode == "I;16B"
    pixels = _assert_rgb(decode_image(path)).astype(int)
    assert abs(pixels[0, 0, 0] - 64) <= 1


def test_32bit_int_in_16bit_range(tmp_path: Path) -> None:
    path = _save(Image.fromarray(np.full((H, W), 65535, np.int32)), tmp_path / "int.tif")
    with Image.open(path) as raw:
        assert raw.mode == "I"
    assert (_assert_rgb(decode_image(path)) == 255).all()


def test_32bit_int_out_of_range_is_stretched(tmp_path: Path) -> None:
    values = np.zeros((H, W), np.int32)
    values[:, : W // 2] = -100_000
    values[:, W // 2 :] = 100_000
    pixels = _assert_rgb(decode_image(_save(Image.fromarray(values), tmp_path / "wide.tif")))
    assert (pixels[:, : W // 2] == 0).all()
    assert (pixels[:, W // 2 :] == 255).all()


@pytest.mark.parametrize(
    ("value", "expected"), [(0.5, 128), (1.0, 255), (0.0, 0), (200.0, 200), (np.nan, 0)]
)
def test_float_image(tmp_path: Path, value: float, expected: int) -> None:
    path = _save(Image.fromarray(np.full((H, W), value, np.float32)), tmp_path / "float.tif")
    with Image.open(path) as raw:
        assert raw.mode == "F"
    pixels = _assert_rgb(decode_image(path)).astype(int)
    assert abs(pixels[0, 0, 0] - expected) <= 1


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 10, 10))  # red block in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    path = _save(image, tmp_path / "rotated.jpg", exif=exif, quality=95)

    decoded = decode_image(path)
    pixels = _assert_rgb(decoded, size=(20, 40))
    top_right = pixels[2, 17].astype(int)
    assert top_right[0] > 200 and top_right[2] < 60  # red moved to the top-right corner
    assert decoded.getexif().get(0x0112, 1) == 1


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (W, H), color) for color in [(255, 0, 0), (0, 0, 255)]]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50, loop=0)
    with Image.open(path) as raw:
        assert raw.n_frames == 2
    pixels = _assert_rgb(decode_image(path))
    assert tuple(pixels[0, 0]) == (255, 0, 0)


def test_gif_transparency_becomes_white(tmp_path: Path) -> None:
    image = Image.new("P", (W, H), 1)
    image.putpalette([0, 0, 0, 0, 128, 0] + [0] * 762)
    image.putpixel((0, 0), 0)
    pixels = _assert_rgb(decode_image(_save(image, tmp_path / "t.gif", transparency=0)))
    assert tuple(pixels[0, 0]) == (255, 255, 255)
    assert tuple(pixels[1, 1]) == (0, 128, 0)


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("img.webp", {"lossless": True}),
        ("img.bmp", {}),
        ("img.tif", {}),
        ("img.tiff", {"compression": "tiff_lzw"}),
        ("img.jpeg", {"quality": 95}),
    ],
)
def test_other_formats(tmp_path: Path, name: str, params: dict[str, object]) -> None:
    path = _save(Image.new("RGB", (W, H), (30, 60, 90)), tmp_path / name, **params)
    pixels = _assert_rgb(decode_image(path)).astype(int)
    assert np.abs(pixels - np.array([30, 60, 90])).max() <= 3


def test_webp_with_alpha(tmp_path: Path) -> None:
    image = Image.new("RGBA", (W, H), (0, 0, 0, 0))
    pixels = _assert_rgb(decode_image(_save(image, tmp_path / "a.webp", lossless=True)))
    assert (pixels == 255).all()


def test_bytes_stream_and_pathlike_inputs(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (W, H), (1, 2, 3)), tmp_path / "in.png")
    data = path.read_bytes()
    for source in (path, str(path), data, bytearray(data), io.BytesIO(data)):
        assert tuple(np.asarray(decode_image(source))[0, 0]) == (1, 2, 3)
    with path.open("rb") as handle:
        assert decode_image(handle).size == (W, H)


def test_result_is_independent_of_the_file(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (W, H), (9, 9, 9)), tmp_path / "gone.png")
    image = decode_image(path)
    os.remove(path)
    assert image.copy().getpixel((0, 0)) == (9, 9, 9)


def test_pixel_limit_is_inclusive(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (10, 10)), tmp_path / "small.png")
    assert decode_image(path, max_pixels=100).size == (10, 10)


def test_caller_limit_wins_over_pillow_global(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _save(Image.new("RGB", (100, 100), (5, 5, 5)), tmp_path / "big.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1_000)  # Pillow would refuse 10 000 px
    assert decode_image(path, max_pixels=20_000).size == (100, 100)
    with pytest.raises(ImageDecodeError, match="over the limit of 5000"):
        decode_image(path, max_pixels=5_000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # Pillow check disabled entirely
    with pytest.raises(ImageDecodeError, match="over the limit of 5000"):
        decode_image(path, max_pixels=5_000)


# ----------------------------------------------------------------------------- bad inputs


def _expect_error(source: object, label: str, reason_start: str, **kwargs: object) -> None:
    with pytest.raises(ImageDecodeError) as excinfo:
        decode_image(source, **kwargs)  # type: ignore[arg-type]
    error = excinfo.value
    assert type(error) is ImageDecodeError
    assert isinstance(error, ValueError)
    assert error.path == label
    assert error.reason.startswith(reason_start), error.reason
    assert str(error) == f"{label}: {error.reason}"


def test_zero_byte_file(tmp_path: Path) -> None:
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    _expect_error(path, str(path), "empty file")
    _expect_error(b"", "<bytes>", "empty file")
    _expect_error(io.BytesIO(b""), "<stream>", "empty file")


@pytest.mark.parametrize(("suffix", "fmt"), [(".png", "PNG"), (".jpg", "JPEG")])
def test_truncated_file(tmp_path: Path, suffix: str, fmt: str) -> None:
    buffer = io.BytesIO()
    _noise((128, 128)).save(buffer, fmt)
    data = buffer.getvalue()
    path = tmp_path / f"cut{suffix}"
    path.write_bytes(data[: len(data) // 2])
    _expect_error(path, str(path), "truncated or corrupt image data: ")
    _expect_error(data[: len(data) // 2], "upload.bin", "truncated or corrupt", path="upload.bin")


def test_text_file_named_png(tmp_path: Path) -> None:
    path = tmp_path / "notes.png"
    path.write_text("this is not an image\n")
    _expect_error(path, str(path), "not an image (cannot identify format)")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.png"
    _expect_error(path, str(path), "file not found")
    _expect_error(
        tmp_path / "no_dir" / "x.png", str(tmp_path / "no_dir" / "x.png"), "file not found"
    )


def test_directory_is_not_an_image(tmp_path: Path) -> None:
    _expect_error(tmp_path, str(tmp_path), "is a directory")


def test_small_max_pixels(tmp_path: Path) -> None:
    path = _save(Image.new("RGB", (20, 10)), tmp_path / "bomb.png")
    _expect_error(
        path, str(path), "image has 20 x 10 = 200 pixels, over the limit of 199", max_pixels=199
    )


def test_bomb_header_is_rejected_before_decoding(tmp_path: Path) -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(100_000, 100_000))
    expected = "image has 100000 x 100000 = 10000000000 pixels, over the limit of 40000000"
    _expect_error(path, str(path), expected)
    _expect_error(path.read_bytes(), "<bytes>", expected)
    assert limit_before == Image.MAX_IMAGE_PIXELS  # the global was never touched


def test_bomb_header_below_pillow_limit_still_uses_ours(tmp_path: Path) -> None:
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_with_header(8_000, 8_000))  # 64M: under Pillow's 89M warning level
    _expect_error(path, str(path), "image has 8000 x 8000 = 64000000 pixels")


def test_stream_name_and_path_override(tmp_path: Path) -> None:
    path = tmp_path / "named.png"
    path.write_text("nope")
    with path.open("rb") as handle:
        _expect_error(handle, str(path), "not an image")
    _expect_error(io.BytesIO(b"nope"), "upload-7", "not an image", path="upload-7")


def test_error_pickles() -> None:
    error = ImageDecodeError("a/b.png", "empty file")
    clone = pickle.loads(pickle.dumps(error))
    assert (clone.path, clone.reason, str(clone)) == (
        "a/b.png",
        "empty file",
        "a/b.png: empty file",
    )


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the damage it sees
def test_no_pillow_exception_leaks_on_corrupted_files() -> None:
    """Flip random bytes in valid files of every format: decoded, or ImageDecodeError only."""
    rng = random.Random(1234)
    originals = []
    for fmt, params in [
        ("PNG", {}),
        ("JPEG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("TIFF", {}),
        ("WEBP", {}),
        ("TIFF", {"compression": "tiff_deflate"}),
    ]:
        buffer = io.BytesIO()
        _noise((32, 32), seed=len(originals)).save(buffer, fmt, **params)
        originals.append(buffer.getvalue())

    for data in originals:
        for _ in range(12):
            corrupted = bytearray(data)
            for _ in range(rng.randint(1, 8)):
                corrupted[rng.randrange(len(corrupted))] = rng.randrange(256)
            if rng.random() < 0.3:
                corrupted = corrupted[: rng.randrange(1, len(corrupted))]
            try:
                image = decode_image(bytes(corrupted), max_pixels=10_000_000)
            except ImageDecodeError as error:
                assert type(error) is ImageDecodeError
            else:
                assert image.mode == "RGB"


# --------------------------------------------------------------------------- batch arrays


def test_load_batch_array_shape_and_values() -> None:
    images = [
        Image.new("RGB", (W, H), (10, 20, 30)),
        Image.new("RGB", (100, 50), (200, 100, 0)),
        Image.new("RGB", (7, 7), (1, 1, 1)),
    ]
    batch = load_batch_array(images, 32)
    assert batch.shape == (3, 32, 32, 3)
    assert batch.dtype == np.uint8
    assert batch.flags.c_contiguous
    assert (batch[0] == [10, 20, 30]).all()
    assert (batch[1] == [200, 100, 0]).all()


def test_load_batch_array_matches_pillow_bilinear() -> None:
    image = _noise((50, 40))
    expected = np.asarray(image.resize((16, 16), Image.Resampling.BILINEAR))
    assert np.array_equal(load_batch_array([image], 16)[0], expected)


def test_load_batch_array_empty_and_invalid() -> None:
    empty = load_batch_array([], 8)
    assert empty.shape == (0, 8, 8, 3)
    assert empty.dtype == np.uint8
    with pytest.raises(ValueError, match="mode 'L'"):
        load_batch_array([Image.new("RGB", (4, 4)), Image.new("L", (4, 4))], 8)
    for size in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="positive int"):
            load_batch_array([Image.new("RGB", (4, 4))], size)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------- file listing


def _touch(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    return path


def test_iter_image_files_filters_and_sorts(tmp_path: Path) -> None:
    for name in [
        "b.JPG",
        "a.png",
        "c.txt",
        "noext",
        ".hidden.png",
        ".cache/x.png",
        "sub/d.jpeg",
        "sub/deeper/e.WebP",
        "sub/.git/f.png",
        "z.tiff",
        "y.Tif",
        "x.bmp",
        "w.gif",
        "v.jpeg.bak",
    ]:
        _touch(tmp_path / name)
    (tmp_path / "dir.png").mkdir()  # a directory with an image-like name is not a file

    found = iter_image_files(tmp_path)
    relative = [p.relative_to(tmp_path).as_posix() for p in found]
    assert relative == [
        "a.png",
        "b.JPG",
        "sub/d.jpeg",
        "sub/deeper/e.WebP",
        "w.gif",
        "x.bmp",
        "y.Tif",
        "z.tiff",
    ]
    assert all(isinstance(p, Path) for p in found)
    assert [p.name for p in iter_image_files(tmp_path, recursive=False)] == [
        "a.png",
        "b.JPG",
        "w.gif",
        "x.bmp",
        "y.Tif",
        "z.tiff",
    ]
    assert iter_image_files(str(tmp_path)) == found


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_iter_image_files_does_not_follow_symlinked_dirs(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _touch(outside / "o.png")
    root = tmp_path / "root"
    _touch(root / "r.png")
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    assert [p.name for p in iter_image_files(root)] == ["r.png"]


def test_iter_image_files_bad_root(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        iter_image_files(tmp_path / "missing")
    with pytest.raises(NotADirectoryError):
        iter_image_files(_touch(tmp_path / "file.png"))
