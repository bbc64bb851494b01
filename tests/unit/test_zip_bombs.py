"""Zip bombs that pass every per-entry check, and names that spoof by bidi reordering.

Overlapping entries (one compressed kernel listed many times, David Fifield's "better zip
bomb") and entries that lie about their size are refused before or while extracting, leaving
nothing in storage; bidi controls never reach a stored image name, whatever the intake.
"""

from __future__ import annotations

import io
import os
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import IO
from typing import cast

import pytest

from face_emotions.data.storage import Storage
from face_emotions.jobs.folder_intake import resolve_folder
from face_emotions.jobs.intake import IntakeError
from face_emotions.jobs.intake import store_uploads
from face_emotions.jobs.zip_intake import extract_zip
from tests.zip_archives import assemble
from tests.zip_archives import central_record
from tests.zip_archives import deflate_raw
from tests.zip_archives import local_header
from tests.zip_archives import lying_zip
from tests.zip_archives import make_zip
from tests.zip_archives import overlapping_zip
from tests.zip_archives import quoted_overlap_zip

MIB = 1024 * 1024
PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64  # content is never decoded by intake
#: 100 kB that deflate to about 2 kB: under the size where ratios are checked, so each copy
#: passes the per-entry checks.
KERNEL = os.urandom(2_000) + b"\x00" * 98_000
SPOOFED = "\u202egnp.exe.png"
#: Every Unicode bidi control (marks, embeddings, overrides, isolates), spelled out here.
BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"


def stored_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def job_storage(tmp_path: Path) -> tuple[Storage, str]:
    return Storage.from_url(tmp_path / "storage"), "jobs/1"


def data_into_the_directory() -> io.BytesIO:
    """One entry whose compressed size reaches 46 bytes into the central directory."""
    data, crc = deflate_raw(KERNEL), zlib.crc32(KERNEL)
    body = local_header(b"a.png", crc, len(data) + 46, len(KERNEL)) + data
    return assemble(body, [central_record(b"a.png", crc, len(data) + 46, len(KERNEL), 0)])


OVERLAPS: dict[str, Callable[[], io.BytesIO]] = {
    "one member listed 200 times": lambda: overlapping_zip(KERNEL, 200),
    "200 names for one member": lambda: overlapping_zip(KERNEL, 200, same_name=False),
    "quoted local header (Fifield)": lambda: quoted_overlap_zip(KERNEL),
    "data running into the central directory": data_into_the_directory,
}


@pytest.mark.parametrize("build", OVERLAPS.values(), ids=OVERLAPS.keys())
def test_overlapping_entries_are_refused_before_anything_is_written(
    tmp_path: Path, build: Callable[[], io.BytesIO]
) -> None:
    archive = build()
    assert len(archive.getvalue()) < 32 * 1024  # while it lists up to 20 MB of images
    storage, prefix = job_storage(tmp_path)
    with pytest.raises(IntakeError) as raised:
        extract_zip(archive, storage, prefix, max_images=1000, max_total_bytes=64 * MIB)
    assert raised.value.code == "unsafe_zip"
    assert "overlap" in raised.value.message
    assert stored_files(tmp_path) == []


class CountingReads:
    """Wraps a member's stream: how many inflated bytes the storage pulled out of it."""

    def __init__(self, stream: IO[bytes], counts: list[int]) -> None:
        self._stream = stream
        self._counts = counts
        counts.append(0)

    def read(self, size: int = -1) -> bytes:
        block = self._stream.read(size)
        self._counts[-1] += len(block)
        return block


def test_an_entry_inflating_past_its_declared_size_is_refused_while_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Declared 100 bytes (with the CRC of those 100 bytes), inflates to 16 MiB: the bytes
    really written are counted, so the copy stops at the first block past the declared size."""
    archive = lying_zip(os.urandom(100) + b"\x00" * (16 * MIB), declared=100)
    storage, prefix = job_storage(tmp_path)
    pulled: list[int] = []
    write_stream = storage.write_stream
    monkeypatch.setattr(
        storage,
        "write_stream",
        lambda key, stream, **kw: write_stream(
            key, cast(IO[bytes], CountingReads(stream, pulled)), **kw
        ),
    )
    with pytest.raises(IntakeError) as raised:
        extract_zip(archive, storage, prefix, max_images=10, max_total_bytes=MIB)
    assert raised.value.code == "unsafe_zip"
    assert "declared size of 100 bytes" in raised.value.message
    assert pulled and max(pulled) <= 2 * MIB  # stopped while inflating, not after 16 MiB
    assert stored_files(tmp_path) == []


def test_entries_written_before_the_liar_are_removed(tmp_path: Path) -> None:
    archive = lying_zip(os.urandom(100) + b"\x00" * MIB, declared=100, honest=2)
    storage, prefix = job_storage(tmp_path)
    with pytest.raises(IntakeError) as raised:
        extract_zip(archive, storage, prefix, max_images=10, max_total_bytes=MIB)
    assert raised.value.code == "unsafe_zip"
    assert "'small.png'" in raised.value.message
    assert stored_files(tmp_path) == []


def _unseekable_zip() -> io.BytesIO:
    """A zip written to a pipe: its members carry data descriptors after their data."""

    class Pipe(io.RawIOBase):
        def __init__(self) -> None:
            self.data = bytearray()

        def writable(self) -> bool:
            return True

        def write(self, block) -> int:
            self.data += block
            return len(block)

    pipe = Pipe()
    with zipfile.ZipFile(pipe, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for name in ("a.png", "dir/b.png"):
            with archive.open(name, "w") as member:
                member.write(PNG)
    return io.BytesIO(bytes(pipe.data))


HONEST: dict[str, Callable[[], io.BytesIO]] = {
    "written by zipfile": lambda: make_zip([("a.png", PNG), ("dir/", b""), ("dir/b.png", PNG)]),
    "data descriptors": _unseekable_zip,
    "self-extracting stub in front": lambda: io.BytesIO(
        b"MZ" + b"\x00" * 500 + make_zip([("a.png", PNG), ("b.png", PNG)]).getvalue()
    ),
}


@pytest.mark.parametrize("build", HONEST.values(), ids=HONEST.keys())
def test_honest_layouts_are_not_overlaps(tmp_path: Path, build: Callable[[], io.BytesIO]) -> None:
    storage, prefix = job_storage(tmp_path)
    extraction = extract_zip(build(), storage, prefix, max_images=10, max_total_bytes=MIB)
    assert len(extraction.images) == 2
    assert all(len(Path(p).read_bytes()) == len(PNG) for p in stored_files(tmp_path))


# -- bidi controls in names ------------------------------------------------------------------


def test_zip_entry_names_lose_their_bidi_controls(tmp_path: Path) -> None:
    names = [SPOOFED, "a\u2066b\u2069/c\u200e\u200f\u061c.png", "\u202ax\u202b\u202c\u202d.txt"]
    archive = make_zip([(name, PNG) for name in names])
    extraction = extract_zip(archive, *job_storage(tmp_path), max_images=10, max_total_bytes=MIB)
    assert [image.path for image in extraction.images] == ["gnp.exe.png", "ab/c.png"]
    assert extraction.skipped_examples == ["x.txt"]


def test_folder_paths_lose_their_bidi_controls(tmp_path: Path) -> None:
    folder = tmp_path / "data" / "faces"
    folder.mkdir(parents=True)
    (folder / SPOOFED).write_bytes(PNG)
    [image] = resolve_folder(tmp_path / "data", "faces", recursive=True, max_images=10)
    assert image.path == "gnp.exe.png"
    assert Path(image.location).name == SPOOFED  # the file itself is still found


def test_uploaded_names_have_no_bidi_controls(tmp_path: Path) -> None:
    files = [(SPOOFED, io.BytesIO(PNG)), (f"dir{BIDI_CONTROLS}/x.png", io.BytesIO(PNG))]
    images = store_uploads(files, *job_storage(tmp_path), max_images=10)
    assert not any(char in image.path for image in images for char in BIDI_CONTROLS)
