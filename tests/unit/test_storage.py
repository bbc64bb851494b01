"""Storage addressed by URL: local disk and a real S3-compatible server (moto, a process)."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import pytest
from PIL import Image as PILImage
from pydantic import ValidationError

from face_emotions.data.storage import Storage
from face_emotions.data.storage import StorageLimitError
from face_emotions.data.storage import StorageReader
from face_emotions.data.storage import check_key
from face_emotions.data.storage import local_path
from face_emotions.data.storage import normalise_url
from face_emotions.data.storage import parse_location
from face_emotions.data.storage import read_location
from face_emotions.jobs.folder_intake import resolve_folder
from face_emotions.jobs.intake import IntakeError
from face_emotions.jobs.intake import store_uploads
from face_emotions.jobs.zip_intake import extract_zip
from face_emotions.serving.image_loading import load_stored_image
from face_emotions.serving.image_loading import max_image_bytes
from face_emotions.serving.image_loading import storage_image_loader
from face_emotions.settings import Settings
from tests.s3_fixtures import MotoServer


def png(color: tuple[int, int, int] = (10, 200, 10), size: int = 8) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (size, size), color).save(buffer, format="PNG")
    return buffer.getvalue()


class Exploding(io.RawIOBase):
    """A stream that fails after its first block, like a client that disconnects."""

    def __init__(self) -> None:
        self.calls = 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        self.calls += 1
        if self.calls > 1:
            raise ConnectionResetError("client went away")
        return b"x" * 100


# -- URLs and keys ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("location", "protocol", "path"),
    [
        ("file:///srv/data/a.png", "file", "/srv/data/a.png"),
        ("file:///srv/data/../x/a (1).png", "file", "/srv/x/a (1).png"),
        ("/srv/data/a.png", "file", "/srv/data/a.png"),
        ("s3://bucket/prefix/a.png", "s3", "bucket/prefix/a.png"),
        ("s3://bucket/prefix/", "s3", "bucket/prefix"),
        ("S3://bucket", "s3", "bucket"),
    ],
)
def test_parse_location(location: str, protocol: str, path: str) -> None:
    parsed = parse_location(location)
    assert (parsed.protocol, parsed.path) == (protocol, path)


@pytest.mark.parametrize(
    "location",
    ["http://host/x", "gs://bucket/x", "file://relative/x", "s3://", "s3://A_Bad/x", "a\x00b", ""],
)
def test_parse_location_refuses(location: str) -> None:
    with pytest.raises(ValueError):
        parse_location(location)


def test_local_path_and_normalise(tmp_path: Path) -> None:
    assert local_path("file:///srv/a b.png") == "/srv/a b.png"
    assert local_path("s3://bucket/a.png") is None
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real", target_is_directory=True)
    assert normalise_url(tmp_path / "link") == f"file://{(tmp_path / 'real').resolve()}"
    assert normalise_url("s3://bucket/prefix/") == "s3://bucket/prefix"


@pytest.mark.parametrize(
    "key",
    ["", "/abs", "../x", "a/../b", "a/..", "./a", "a//b", "a/", "a\\b", "C:/x", "a\x00b"],
)
def test_invalid_keys_are_refused(tmp_path: Path, key: str) -> None:
    storage = Storage.from_url(tmp_path / "store")
    with pytest.raises(ValueError):
        check_key(key)
    with pytest.raises(ValueError):
        storage.write_bytes(key, b"x")
    with pytest.raises(ValueError):
        storage.delete_prefix(key)
    assert not any(tmp_path.rglob("*.png")) and not (tmp_path / "x").exists()


# -- settings --------------------------------------------------------------------------------


def test_settings_storage_and_data_root(tmp_path: Path) -> None:
    settings = Settings(var_dir=tmp_path / "var", data_root=tmp_path / "data")
    assert settings.resolved_storage_url == f"file://{tmp_path.resolve() / 'var' / 'storage'}"
    assert settings.data_root == str(tmp_path / "data")
    assert settings.resolved_data_root == (tmp_path / "data").resolve()
    assert not settings.data_root_is_remote

    plain = Settings(var_dir=tmp_path / "var", storage_url=str(tmp_path / "uploads"))
    assert plain.resolved_storage_url == f"file://{tmp_path.resolve() / 'uploads'}"

    remote = Settings(
        var_dir=tmp_path / "var", storage_url="s3://uploads/jobs/", data_root="s3://data/faces"
    )
    assert remote.resolved_storage_url == "s3://uploads/jobs"
    assert remote.data_root_is_remote
    with pytest.raises(ValueError):
        _ = remote.resolved_data_root


def test_settings_refuse_unknown_schemes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValidationError):
        Settings(var_dir=tmp_path, storage_url="ftp://host/x")
    monkeypatch.setenv("EMOTIONS_DATA_ROOT", "gs://bucket/faces")
    with pytest.raises(ValidationError):
        Settings(var_dir=tmp_path)


# -- local storage ---------------------------------------------------------------------------


@pytest.mark.parametrize("as_url", [False, True])
def test_local_round_trip(tmp_path: Path, as_url: bool) -> None:
    root = tmp_path / "store"
    storage = Storage.from_url(f"file://{root}" if as_url else root)
    assert storage.is_local and storage.url == f"file://{root.resolve()}"

    payload = bytes(range(256)) * 9000  # over two copy blocks
    assert storage.write_stream("jobs/1/a (1).png", io.BytesIO(payload)) == len(payload)
    url = storage.url_for("jobs/1/a (1).png")
    assert url == f"file://{root.resolve()}/jobs/1/a (1).png"
    assert (root / "jobs" / "1" / "a (1).png").read_bytes() == payload
    assert storage.read_bytes(url) == payload == storage.read_bytes("jobs/1/a (1).png")
    assert read_location(url) == payload
    assert storage.exists("jobs/1/a (1).png") and not storage.exists("jobs/1/b.png")

    with pytest.raises(FileExistsError):  # local writes never overwrite
        storage.write_bytes("jobs/1/a (1).png", b"other")
    assert storage.read_bytes(url) == payload
    with pytest.raises(ValueError):
        storage.read_bytes(f"file://{tmp_path}/elsewhere.png")  # not inside the root


def test_local_delete_prefix_and_find(tmp_path: Path) -> None:
    storage = Storage.from_url(tmp_path / "store")
    for key in ("jobs/ab/x.png", "jobs/ab/sub/y.png", "jobs/abc/z.png", "other.png"):
        storage.write_bytes(key, b"1")
    assert storage.find("jobs") == ["jobs/ab/sub/y.png", "jobs/ab/x.png", "jobs/abc/z.png"]
    assert storage.find("jobs/ab", recursive=False) == ["jobs/ab/x.png"]
    storage.delete_prefix("jobs/ab")
    assert storage.find() == ["jobs/abc/z.png", "other.png"]
    storage.delete_prefix("jobs/missing")  # not an error
    storage.delete("other.png")
    storage.delete("other.png")
    assert storage.find() == ["jobs/abc/z.png"]


def test_write_limit_and_failure_leave_nothing(tmp_path: Path) -> None:
    storage = Storage.from_url(tmp_path / "store")
    with pytest.raises(StorageLimitError) as raised:
        storage.write_stream("big.png", io.BytesIO(b"x" * 2000), max_bytes=1000)
    assert raised.value.limit == 1000
    assert not storage.exists("big.png")
    assert storage.write_stream("exact.png", io.BytesIO(b"x" * 1000), max_bytes=1000) == 1000
    with pytest.raises(ConnectionResetError):
        storage.write_stream("cut.png", Exploding())
    assert storage.find() == ["exact.png"]


def test_reader_limits_and_missing(tmp_path: Path) -> None:
    (tmp_path / "a.bin").write_bytes(b"y" * 100)
    (tmp_path / "empty.bin").write_bytes(b"")
    reader = StorageReader()
    assert reader.read_bytes(str(tmp_path / "a.bin"), max_bytes=100) == b"y" * 100
    assert reader.read_bytes(f"file://{tmp_path}/empty.bin", max_bytes=10) == b""
    with pytest.raises(StorageLimitError):
        reader.read_bytes(str(tmp_path / "a.bin"), max_bytes=99)
    with pytest.raises(FileNotFoundError):
        reader.read_bytes(f"file://{tmp_path}/missing.png")


def test_loader_reads_paths_and_file_urls(tmp_path: Path) -> None:
    (tmp_path / "a b.png").write_bytes(png())
    (tmp_path / "bad.png").write_bytes(b"not an image")
    for location in (str(tmp_path / "a b.png"), f"file://{tmp_path}/a b.png"):
        image = load_stored_image(location, 1000)
        assert isinstance(image, PILImage.Image) and image.size == (8, 8)
    assert load_stored_image(f"file://{tmp_path}/missing.png", 1000) == "file not found"
    assert load_stored_image(str(tmp_path / "bad.png"), 1000) == (
        "not an image (cannot identify format)"
    )
    assert load_stored_image("gs://bucket/a.png", 1000).startswith("unsupported location")
    assert max_image_bytes(10) == 40 + 1024 * 1024


# -- S3 (moto_server process) ----------------------------------------------------------------


@pytest.fixture
def bucket(moto_server: MotoServer) -> str:
    return moto_server.create_bucket(f"unit-{uuid.uuid4().hex[:12]}")


def test_s3_round_trip(moto_server: MotoServer, bucket: str) -> None:
    storage = Storage.from_url(f"s3://{bucket}/prefix", s3_endpoint_url=moto_server.endpoint_url)
    assert not storage.is_local and storage.url == f"s3://{bucket}/prefix"
    payload = png()
    assert storage.write_stream("jobs/1/a (1).png", io.BytesIO(payload)) == len(payload)
    storage.write_bytes("jobs/1/b.png", b"bb")
    storage.write_bytes("jobs/12/c.png", b"cc")
    url = storage.url_for("jobs/1/a (1).png")
    assert url == f"s3://{bucket}/prefix/jobs/1/a (1).png"
    assert moto_server.keys(bucket) == [
        "prefix/jobs/1/a (1).png",
        "prefix/jobs/1/b.png",
        "prefix/jobs/12/c.png",
    ]
    assert storage.read_bytes(url) == payload == storage.read_bytes("jobs/1/a (1).png")
    assert storage.exists(url) and not storage.exists("jobs/1/missing.png")
    assert storage.is_dir("jobs/1") and not storage.is_dir("jobs/2")
    assert storage.find("jobs", recursive=False) == []
    assert storage.find("jobs/1") == ["jobs/1/a (1).png", "jobs/1/b.png"]

    storage.delete_prefix("jobs/1")  # whole components: jobs/12 stays
    assert moto_server.keys(bucket) == ["prefix/jobs/12/c.png"]
    storage.delete_prefix("jobs/1")
    storage.delete("jobs/12/c.png")
    assert moto_server.keys(bucket) == []


def test_s3_write_failures_leave_nothing(moto_server: MotoServer, bucket: str) -> None:
    storage = Storage.from_url(f"s3://{bucket}", s3_endpoint_url=moto_server.endpoint_url)
    with pytest.raises(StorageLimitError):
        storage.write_stream("big.png", io.BytesIO(b"x" * 5000), max_bytes=4096)
    with pytest.raises(ConnectionResetError):
        storage.write_stream("cut.png", Exploding())
    assert moto_server.keys(bucket) == []


def test_s3_reader_and_loader(moto_server: MotoServer, bucket: str) -> None:
    moto_server.put(bucket, "faces/a.png", png())
    moto_server.put(bucket, "faces/empty.png", b"")
    moto_server.put(bucket, "faces/text.png", b"hello")
    reader = StorageReader(s3_endpoint_url=moto_server.endpoint_url)
    assert reader.read_bytes(f"s3://{bucket}/faces/a.png") == png()
    assert reader.read_bytes(f"s3://{bucket}/faces/empty.png", max_bytes=10) == b""
    with pytest.raises(StorageLimitError):
        reader.read_bytes(f"s3://{bucket}/faces/text.png", max_bytes=4)
    with pytest.raises(FileNotFoundError):
        reader.read_bytes(f"s3://{bucket}/faces/missing.png")
    with pytest.raises(FileNotFoundError):
        reader.read_bytes("s3://no-such-bucket-here/a.png")

    load = storage_image_loader(
        Settings(var_dir=Path("/nonexistent"), s3_endpoint_url=moto_server.endpoint_url)
    )
    image = load(f"s3://{bucket}/faces/a.png", 1000)
    assert isinstance(image, PILImage.Image) and image.size == (8, 8)
    assert load(f"s3://{bucket}/faces/missing.png", 1000) == "file not found"
    assert load(f"s3://{bucket}/faces/empty.png", 1000) == "empty file"
    assert load(f"s3://{bucket}/faces/text.png", 1000) == "not an image (cannot identify format)"
    assert (
        load(f"s3://{bucket}/faces/a.png", 10)
        == "image has 8 x 8 = 64 pixels, over the limit of 10"
    )
    moto_server.put(bucket, "faces/huge.png", b"\x00" * (max_image_bytes(10) + 1))
    assert load(f"s3://{bucket}/faces/huge.png", 10) == "file is larger than 1048616 bytes"


def test_s3_uploads_and_zip_through_intake(moto_server: MotoServer, bucket: str) -> None:
    import zipfile

    storage = Storage.from_url(f"s3://{bucket}/up", s3_endpoint_url=moto_server.endpoint_url)
    images = store_uploads(
        [("../a.png", io.BytesIO(b"1")), ("a.png", io.BytesIO(b"2"))],
        storage,
        "jobs/j1",
        max_images=5,
    )
    assert [image.location for image in images] == [
        f"s3://{bucket}/up/jobs/j1/a.png",
        f"s3://{bucket}/up/jobs/j1/a (1).png",
    ]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("happy/x.png", png())
        zf.writestr("sad/y.PNG", png((1, 2, 3)))
    result = extract_zip(archive, storage, "jobs/j2", max_images=5, max_total_bytes=1 << 20)
    assert [image.path for image in result.images] == ["happy/x.png", "sad/y.PNG"]
    assert moto_server.keys(bucket, "up/jobs/j2/") == [
        "up/jobs/j2/000000.png",
        "up/jobs/j2/000001.png",
    ]
    bomb = io.BytesIO()
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ok.png", png())
        zf.writestr("big.png", b"\x00" * 200_000)
    with pytest.raises(IntakeError) as raised:
        extract_zip(bomb, storage, "jobs/j3", max_images=5, max_total_bytes=100_000)
    assert raised.value.code == "too_large"
    assert moto_server.keys(bucket, "up/jobs/j3/") == []


def test_s3_folder_jobs(moto_server: MotoServer, bucket: str) -> None:
    for key in (
        "faces/happy/a.png",
        "faces/b.jpg",
        "faces/notes.txt",
        "faces/.hidden/c.png",
        "faces/happy/.d.png",
        "other/e.png",
        "docs/readme.txt",
    ):
        moto_server.put(bucket, key, png())
    endpoint = moto_server.endpoint_url

    def resolve(root: str, folder: str, recursive: bool = True, max_images: int = 10):
        return resolve_folder(
            root, folder, recursive=recursive, max_images=max_images, s3_endpoint_url=endpoint
        )

    images = resolve(f"s3://{bucket}", "faces")
    assert [image.path for image in images] == ["b.jpg", "happy/a.png"]
    assert [image.location for image in images] == [
        f"s3://{bucket}/faces/b.jpg",
        f"s3://{bucket}/faces/happy/a.png",
    ]
    assert [image.path for image in resolve(f"s3://{bucket}/faces", ".", False)] == ["b.jpg"]
    assert [image.path for image in resolve(f"s3://{bucket}/faces/", "happy/")] == ["a.png"]
    assert {image.path for image in resolve(f"s3://{bucket}", ".")} == {
        "faces/b.jpg",
        "faces/happy/a.png",
        "other/e.png",
    }
    refusals = [
        ("../other", "invalid_path"),
        ("faces/../../x", "invalid_path"),
        ("/faces", "invalid_path"),
        ("C:/faces", "invalid_path"),
        ("missing", "not_found"),
        ("faces/b.jpg", "not_found"),
        ("faces/notes.txt", "not_found"),
        ("docs", "empty"),
    ]
    for folder, code in refusals:
        with pytest.raises(IntakeError) as raised:
            resolve(f"s3://{bucket}", folder)
        assert raised.value.code == code, folder
    # As on disk: hidden entries below the folder are skipped, a hidden folder named on purpose
    # is read.
    assert [image.path for image in resolve(f"s3://{bucket}", "faces/.hidden")] == ["c.png"]
    with pytest.raises(IntakeError) as raised:
        resolve(f"s3://{bucket}", "faces", max_images=1)
    assert raised.value.code == "too_many_images"
    with pytest.raises(IntakeError) as raised:
        resolve("s3://no-such-bucket-here", "faces")
    assert raised.value.code == "not_found"
