"""Hostile and ordinary submissions: uploads, zip archives and server-side folders."""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from face_emotions.data.storage import Storage
from face_emotions.data.storage import local_path
from face_emotions.jobs.folder_intake import resolve_folder
from face_emotions.jobs.intake import IntakeError
from face_emotions.jobs.intake import secure_name
from face_emotions.jobs.intake import store_uploads
from face_emotions.jobs.zip_intake import extract_zip
from tests.zip_archives import encrypted_zip
from tests.zip_archives import make_zip
from tests.zip_archives import symlink_entry

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # content is never decoded by intake


def all_files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file() or p.is_symlink()}


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, Path]:
    """(dest_dir, outside): anything written to ``outside`` is a traversal."""
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "a" / "b" / "job"
    return dest, outside


def job_storage(dest: Path) -> tuple[Storage, str]:
    """(storage, prefix) that writes the job's objects into the local directory ``dest``."""
    return Storage.from_url(dest.parent), dest.name


def stored_path(location: str) -> Path:
    path = local_path(location)
    assert path is not None and location.startswith("file://"), location
    return Path(path)


def assert_contained(tmp_path: Path, dest: Path) -> None:
    """Every file under tmp_path is inside dest (or is a fixture we created on purpose)."""
    for path in all_files(tmp_path):
        assert path.is_relative_to(dest) or "fixture" in path.parts, path


# -- zip archives ---------------------------------------------------------------------------


def too_many_entries() -> io.BytesIO:
    return make_zip([(f"{i}.png", PNG) for i in range(6)])


HOSTILE_ZIPS: list[tuple[str, Callable[[], io.BytesIO], str, dict]] = [
    ("zip slip", lambda: make_zip([("../evil.png", PNG)]), "unsafe_zip", {}),
    ("nested zip slip", lambda: make_zip([("ok/../../evil.png", PNG)]), "unsafe_zip", {}),
    ("absolute path", lambda: make_zip([("/etc/x.png", PNG)]), "unsafe_zip", {}),
    ("backslash absolute", lambda: make_zip([("\\evil.png", PNG)]), "unsafe_zip", {}),
    ("backslash slip", lambda: make_zip([("..\\evil.png", PNG)]), "unsafe_zip", {}),
    ("drive letter", lambda: make_zip([("C:/evil.png", PNG)]), "unsafe_zip", {}),
    (
        "symlink entry",
        lambda: make_zip([symlink_entry("link.png", "/etc/passwd")]),
        "unsafe_zip",
        {},
    ),
    ("encrypted", lambda: encrypted_zip(PNG), "unsafe_zip", {}),
    (
        "zip bomb by ratio",
        lambda: make_zip([("a.png", b"\x00" * (10 * 1024 * 1024))]),
        "unsafe_zip",
        {"max_total_bytes": 1 << 30},
    ),
    ("too many images", too_many_entries, "too_many_images", {"max_images": 5}),
    (
        "too many entries",
        lambda: make_zip([(f"{i}.txt", b"x") for i in range(50)] + [("a.png", PNG)]),
        "unsafe_zip",
        {"max_entries": 20},
    ),
    (
        "total size over the limit",
        lambda: make_zip([(f"{i}.png", os.urandom(4000)) for i in range(3)]),
        "too_large",
        {"max_total_bytes": 10_000},
    ),
    ("not a zip", lambda: io.BytesIO(b"this is not a zip file" * 10), "invalid_zip", {}),
    ("empty stream", lambda: io.BytesIO(b""), "invalid_zip", {}),
    ("no images", lambda: make_zip([("readme.txt", b"hi")]), "empty", {}),
]


@pytest.mark.parametrize(
    ("build", "code", "limits"),
    [pytest.param(build, code, limits, id=name) for name, build, code, limits in HOSTILE_ZIPS],
)
def test_hostile_zip_is_refused_and_writes_nothing(
    tmp_path: Path, sandbox: tuple[Path, Path], build, code: str, limits: dict
) -> None:
    dest, outside = sandbox
    options = {"max_images": 100, "max_total_bytes": 1 << 20, **limits}
    with pytest.raises(IntakeError) as raised:
        extract_zip(build(), *job_storage(dest), **options)
    assert raised.value.code == code
    assert raised.value.message
    assert not all_files(outside)
    assert not all_files(tmp_path / "a")  # nothing left behind, not even inside dest
    assert not (tmp_path / "evil.png").exists()


def test_declared_sizes_are_not_trusted(tmp_path: Path) -> None:
    """An entry that lies about its size in the directory is stopped while inflating."""
    payload = os.urandom(50_000)
    buffer = make_zip([("a.png", payload), ("b.png", payload)])
    data = bytearray(buffer.getvalue())
    # Shrink the declared uncompressed sizes in the central directory (offset 24) to 10 bytes.
    position = 0
    while (position := data.find(b"PK\x01\x02", position)) != -1:
        data[position + 24 : position + 28] = (10).to_bytes(4, "little")
        position += 4
    dest = tmp_path / "job"
    with pytest.raises(IntakeError) as raised:
        extract_zip(
            io.BytesIO(bytes(data)), *job_storage(dest), max_images=10, max_total_bytes=60_000
        )
    assert raised.value.code in {"unsafe_zip", "too_large", "invalid_zip"}
    assert not all_files(tmp_path)


def test_zip_extracts_images_and_skips_the_rest(tmp_path: Path) -> None:
    archive = make_zip(
        [
            ("happy/a.png", PNG),
            ("happy/b.JPG", PNG),
            ("sad/", b""),
            ("sad/c.jpeg", PNG),
            ("./d.png", PNG),
            ("__MACOSX/happy/._a.png", b"meta"),
            (".hidden.png", PNG),
            ("happy/.DS_Store", b"x"),
            ("notes.txt", b"x"),
        ]
    )
    dest = tmp_path / "job"
    result = extract_zip(archive, *job_storage(dest), max_images=10, max_total_bytes=1 << 20)
    assert [image.path for image in result.images] == [
        "happy/a.png",
        "happy/b.JPG",
        "sad/c.jpeg",
        "./d.png",
    ]
    assert result.skipped == 5
    for image in result.images:
        location = stored_path(image.location)
        assert location.parent == dest.resolve()
        assert location.read_bytes() == PNG
    assert all_files(tmp_path) == {stored_path(image.location) for image in result.images}


def test_small_highly_compressible_images_are_not_bombs(tmp_path: Path) -> None:
    """A flat-colour BMP compresses hundreds to one; under 1 MiB the ratio isn't checked."""
    flat = b"BM" + b"\xff" * 200_000
    result = extract_zip(
        make_zip([("flat.bmp", flat)]),
        *job_storage(tmp_path / "job"),
        max_images=5,
        max_total_bytes=1 << 20,
    )
    assert len(result.images) == 1


def test_unseekable_stream_is_spooled(tmp_path: Path) -> None:
    data = make_zip([("a.png", PNG)]).getvalue()

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self._inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def seekable(self) -> bool:
            return False

        def readinto(self, buffer) -> int:
            chunk = self._inner.read(len(buffer))
            buffer[: len(chunk)] = chunk
            return len(chunk)

    result = extract_zip(
        Pipe(), *job_storage(tmp_path / "job"), max_images=5, max_total_bytes=1 << 20
    )
    assert [image.path for image in result.images] == ["a.png"]


# -- uploads --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("face.png", "face.png"),
        ("../../etc/passwd.png", "passwd.png"),
        ("/etc/x.png", "x.png"),
        ("C:\\Users\\me\\face.JPG", "face.JPG"),
        ("my face (1).png", "my_face_1.png"),
        (".hidden.png", "hidden.png"),
        ("..png", "png"),
        ("café.png", "cafe.png"),
        ("笑顔.png", "upload.png"),
        ("CON.png", "_CON.png"),
        ("a\x00b.png", "ab.png"),
        ("", "upload"),
    ],
)
def test_secure_name(name: str, expected: str) -> None:
    assert secure_name(name) == expected


def test_store_uploads_sanitises_and_deduplicates(tmp_path: Path) -> None:
    dest = tmp_path / "job"
    files = [
        ("a.png", io.BytesIO(b"1")),
        ("../a.png", io.BytesIO(b"2")),
        ("x/A.png", io.BytesIO(b"3")),
        ("/etc/b.jpg", io.BytesIO(b"4")),
    ]
    images = store_uploads(files, *job_storage(dest), max_images=10)
    # Folders are kept (uploads of a folder keep their paths); what leads out is dropped.
    assert [image.path for image in images] == ["a.png", "a (1).png", "x/A.png", "etc/b.jpg"]
    contents = [stored_path(image.location).read_bytes() for image in images]
    assert contents == [b"1", b"2", b"3", b"4"]
    assert all_files(tmp_path) == {stored_path(image.location) for image in images}
    assert all(stored_path(image.location).is_relative_to(dest.resolve()) for image in images)


def test_store_uploads_streams_large_files(tmp_path: Path) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)
    images = store_uploads(
        [("big.png", io.BytesIO(payload))], *job_storage(tmp_path / "job"), max_images=1
    )
    assert stored_path(images[0].location).read_bytes() == payload


def test_store_uploads_removes_what_it_wrote_when_a_stream_fails(tmp_path: Path) -> None:
    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            raise ConnectionResetError("client went away")

    files = [("a.png", io.BytesIO(b"1")), ("b.png", Broken())]
    with pytest.raises(ConnectionResetError):
        store_uploads(files, *job_storage(tmp_path / "job"), max_images=5)
    assert not all_files(tmp_path)


def test_resolve_folder_accepts_a_file_url(data_tree: tuple[Path, Path]) -> None:
    root, _ = data_tree
    (root / "leaky" / "stolen.png").unlink()
    images = resolve_folder(f"file://{root}", "faces", recursive=True, max_images=10)
    assert [image.path for image in images] == ["b.jpg", "happy/a.png"]
    assert all(Path(image.location).is_relative_to(root.resolve()) for image in images)
    with pytest.raises(IntakeError) as raised:
        resolve_folder(f"file://{root}", "linked-out", recursive=True, max_images=10)
    assert raised.value.code == "invalid_path"


@pytest.mark.parametrize(
    ("files", "code"),
    [
        ([("notes.txt", b"x")], "unsupported_file"),
        ([("a.png", b"x"), ("evil.sh", b"x")], "unsupported_file"),
        ([("archive.png.exe", b"x")], "unsupported_file"),
        ([], "empty"),
        ([(f"{i}.png", b"x") for i in range(4)], "too_many_images"),
    ],
)
def test_store_uploads_refuses_and_writes_nothing(
    tmp_path: Path, files: list[tuple[str, bytes]], code: str
) -> None:
    dest = tmp_path / "job"
    with pytest.raises(IntakeError) as raised:
        store_uploads([(n, io.BytesIO(d)) for n, d in files], *job_storage(dest), max_images=3)
    assert raised.value.code == code
    assert not all_files(tmp_path)


# -- folders --------------------------------------------------------------------------------


@pytest.fixture
def data_tree(tmp_path: Path) -> tuple[Path, Path]:
    """A data root with images, a secret outside it, and symlinks planted to reach it."""
    root = tmp_path / "data"
    (root / "faces" / "happy").mkdir(parents=True)
    (root / "faces" / "happy" / "a.png").write_bytes(PNG)
    (root / "faces" / "b.jpg").write_bytes(PNG)
    (root / "faces" / "notes.txt").write_text("x")
    (root / "empty").mkdir()
    secret = tmp_path / "fixture-secret"
    secret.mkdir()
    (secret / "secret.png").write_bytes(PNG)
    (root / "linked-out").symlink_to(secret, target_is_directory=True)
    (root / "leaky").mkdir()
    (root / "leaky" / "ok.png").write_bytes(PNG)
    (root / "leaky" / "stolen.png").symlink_to(secret / "secret.png")
    (root / "linked-in").symlink_to(root / "faces", target_is_directory=True)
    return root, secret


def test_resolve_folder_lists_images(data_tree: tuple[Path, Path]) -> None:
    root, _ = data_tree
    images = resolve_folder(root, "faces", recursive=True, max_images=10)
    assert [image.path for image in images] == ["b.jpg", "happy/a.png"]
    assert all(Path(image.location).is_relative_to(root.resolve()) for image in images)
    flat = resolve_folder(root, "faces/", recursive=False, max_images=10)
    assert [image.path for image in flat] == ["b.jpg"]


def test_symlink_inside_the_root_is_allowed(data_tree: tuple[Path, Path]) -> None:
    root, _ = data_tree
    images = resolve_folder(root, "linked-in", recursive=True, max_images=10)
    assert [image.path for image in images] == ["b.jpg", "happy/a.png"]
    assert all("faces" in Path(image.location).parts for image in images)


@pytest.mark.parametrize(
    ("folder", "code"),
    [
        ("../", "invalid_path"),
        ("faces/../../", "invalid_path"),
        ("faces/..", "invalid_path"),
        ("..\\faces", "invalid_path"),
        ("/etc", "invalid_path"),
        ("\\etc", "invalid_path"),
        ("C:/data", "invalid_path"),
        ("fa\x00ces", "invalid_path"),
        ("linked-out", "invalid_path"),  # symlinked folder pointing outside the root
        ("leaky", "invalid_path"),  # symlinked file pointing outside the root
        ("missing", "not_found"),
        ("faces/b.jpg", "not_found"),  # a file, not a folder
        ("empty", "empty"),
    ],
)
def test_resolve_folder_refusals(data_tree: tuple[Path, Path], folder: str, code: str) -> None:
    root, _ = data_tree
    with pytest.raises(IntakeError) as raised:
        resolve_folder(root, folder, recursive=True, max_images=10)
    assert raised.value.code == code


def test_resolve_folder_too_many(data_tree: tuple[Path, Path]) -> None:
    root, _ = data_tree
    with pytest.raises(IntakeError) as raised:
        resolve_folder(root, "faces", recursive=True, max_images=1)
    assert raised.value.code == "too_many_images"


def test_resolve_folder_root_itself(data_tree: tuple[Path, Path]) -> None:
    """ "." is the data root; the recursive scan must not follow the outward symlinks."""
    root, _ = data_tree
    with pytest.raises(IntakeError) as raised:  # leaky/stolen.png is a file symlink
        resolve_folder(root, ".", recursive=True, max_images=100)
    assert raised.value.code == "invalid_path"
    (root / "leaky" / "stolen.png").unlink()
    images = resolve_folder(root, ".", recursive=True, max_images=100)
    assert "linked-out/secret.png" not in {image.path for image in images}
    assert {image.path for image in images} == {"faces/b.jpg", "faces/happy/a.png", "leaky/ok.png"}


def test_intake_error_pickles() -> None:
    import pickle

    error = pickle.loads(pickle.dumps(IntakeError("empty", "nothing")))
    assert (error.code, error.message) == ("empty", "nothing")


#: An uploaded name -> what the job keeps of it.
UPLOADED_NAMES = {
    "Angry/0.jpg": "Angry/0.jpg",
    "faces/Fear/0.jpg": "faces/Fear/0.jpg",
    "../../etc/x.png": "etc/x.png",
    "C:\\photos\\a.png": "photos/a.png",
    "/abs/x.png": "abs/x.png",
    "a/./b/../c.png": "a/b/c.png",
    "ümlaut dir/a b.png": "umlaut_dir/a_b.png",
    ".hidden/x.png": "hidden/x.png",
    "x.png": "x.png",
}


@pytest.mark.parametrize(("name", "kept"), UPLOADED_NAMES.items())
def test_uploaded_names_keep_safe_folders(name: str, kept: str) -> None:
    from face_emotions.jobs.intake import secure_relative_name

    assert secure_relative_name(name) == kept


def test_uploaded_folders_are_bounded_in_depth() -> None:
    from face_emotions.jobs.intake import MAX_DEPTH
    from face_emotions.jobs.intake import secure_relative_name

    deep = "/".join(f"d{i}" for i in range(20)) + "/x.png"
    assert secure_relative_name(deep).count("/") == MAX_DEPTH - 1
