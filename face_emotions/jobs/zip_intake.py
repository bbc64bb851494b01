"""A zip archive of images, extracted into storage without trusting anything it declares.

Zip members can name paths outside the job (``../x``, ``/etc/x``, ``C:\\x``), be symlinks or
encrypted, inflate a few KiB into gigabytes, share their bytes with other members (a "better zip
bomb") or lie about their sizes. Members are vetted from the central directory first (names,
kinds, counts, declared sizes and ratios, overlaps), then streamed into storage while every
inflated byte is counted.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import stat
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from dataclasses import field
from typing import IO

from face_emotions.data.data_root import DRIVE_LETTER
from face_emotions.data.storage import Storage
from face_emotions.data.storage import StorageLimitError
from face_emotions.jobs.intake import COPY_BUFFER
from face_emotions.jobs.intake import RATIO_CHECK_MIN_BYTES
from face_emotions.jobs.intake import IntakeError
from face_emotions.jobs.intake import has_image_extension
from face_emotions.jobs.intake import image_name
from face_emotions.jobs.intake import job_key
from face_emotions.jobs.intake import remove_all
from face_emotions.jobs.job_queries import NewImage
from face_emotions.jobs.zip_layout import refuse_overlapping_entries


@dataclass(frozen=True)
class ZipExtraction:
    """What :func:`extract_zip` kept, and how many entries it skipped on purpose (not images,
    hidden files, folders); ``skipped_examples`` names the first ten, for the client to check."""

    images: list[NewImage]
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def _unsafe_member_reason(name: str) -> str | None:
    """Why a member name could write outside the extraction directory, or None if it can't."""
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith(("/", "\\")):
        return "is an absolute path"
    if DRIVE_LETTER.match(name):
        return "has a drive letter"
    if ".." in re.split(r"[/\\]", name):
        return "contains '..'"
    return None


def _is_symlink(info: zipfile.ZipInfo) -> bool:
    mode = info.external_attr >> 16
    return bool(mode) and stat.S_ISLNK(mode)


def _skip_reason(info: zipfile.ZipInfo) -> str | None:
    """Entries that are not errors but are not images to classify either."""
    if info.is_dir():
        return "directory"
    parts = [part for part in re.split(r"[/\\]", info.filename) if part not in ("", ".")]
    if not parts:
        return "directory"
    if parts[0] == "__MACOSX":
        return "macOS metadata"
    if any(part.startswith(".") for part in parts):
        return "hidden"
    if not has_image_extension(parts[-1]):
        return "not an image"
    return None


def extract_zip(
    stream: IO[bytes],
    storage: Storage,
    prefix: str,
    *,
    max_images: int,
    max_total_bytes: int,
    max_ratio: float = 100,
    max_entries: int | None = None,
) -> ZipExtraction:
    """Extract the images of a zip archive below ``prefix``; ``path`` is the name in the zip.

    The whole central directory is vetted before anything is written (hostile names, symlinks,
    encryption, entry count, overlapping entries, declared sizes, per-entry compression ratio),
    then every byte is counted while inflating, because declared sizes are attacker-controlled:
    an entry that inflates past its declared size is refused. A refusal removes whatever was
    already written. ``path`` drops bidi controls (:func:`~.intake.image_name`). Files are stored
    as ``000000.png``, ``000001.jpg``... rather than under their archive names, so duplicate
    names, case collisions or names the filesystem can't hold can't break the job.
    """
    if max_entries is None:
        max_entries = max(2 * max_images, max_images + 1000)
    with _seekable(stream) as seekable:
        try:
            archive = zipfile.ZipFile(seekable)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError) as exc:
            raise IntakeError("invalid_zip", f"not a readable zip archive: {exc}") from exc
        with archive:
            members, skipped, examples = _vet_members(
                archive,
                seekable,
                max_images=max_images,
                max_total_bytes=max_total_bytes,
                max_ratio=max_ratio,
                max_entries=max_entries,
            )
            images = _extract_members(archive, members, storage, prefix, max_total_bytes)
    return ZipExtraction(images=images, skipped=skipped, skipped_examples=examples)


def _vet_members(
    archive: zipfile.ZipFile,
    stream: IO[bytes],
    *,
    max_images: int,
    max_total_bytes: int,
    max_ratio: float,
    max_entries: int,
) -> tuple[list[zipfile.ZipInfo], int, list[str]]:
    infos = archive.infolist()
    if len(infos) > max_entries:
        raise IntakeError(
            "unsafe_zip", f"the archive has {len(infos)} entries; at most {max_entries} allowed"
        )
    refuse_overlapping_entries(archive, stream)
    members: list[zipfile.ZipInfo] = []
    skipped: list[str] = []
    declared = 0
    for info in infos:
        reason = _unsafe_member_reason(info.filename)
        if reason is not None:
            raise IntakeError("unsafe_zip", f"zip entry {info.filename!r} {reason}")
        if _is_symlink(info):
            raise IntakeError("unsafe_zip", f"zip entry {info.filename!r} is a symbolic link")
        if info.flag_bits & 0x1:
            raise IntakeError(
                "unsafe_zip", f"zip entry {info.filename!r} is encrypted; upload it unencrypted"
            )
        if _skip_reason(info) is not None:
            skipped.append(image_name(info.filename))
            continue
        if info.file_size >= RATIO_CHECK_MIN_BYTES and info.file_size > max_ratio * max(
            info.compress_size, 1
        ):
            raise IntakeError(
                "unsafe_zip",
                f"zip entry {info.filename!r} compresses {info.file_size} bytes into "
                f"{info.compress_size}: over the ratio limit of {max_ratio:g} (zip bomb?)",
            )
        declared += info.file_size
        if declared > max_total_bytes:
            raise IntakeError(
                "too_large",
                f"the archive's images are over {max_total_bytes} bytes uncompressed",
            )
        members.append(info)
        if len(members) > max_images:
            raise IntakeError("too_many_images", f"the archive has more than {max_images} images")
    if not members:
        raise IntakeError(
            "empty", f"the archive has no image files ({len(skipped)} other entries skipped)"
        )
    return members, len(skipped), skipped[:10]


def _extract_members(
    archive: zipfile.ZipFile,
    members: list[zipfile.ZipInfo],
    storage: Storage,
    prefix: str,
    max_total_bytes: int,
) -> list[NewImage]:
    written: list[str] = []
    total = 0
    try:
        images: list[NewImage] = []
        for index, info in enumerate(members):
            suffix = os.path.splitext(info.filename)[1].lower()
            key = job_key(prefix, f"{index:06d}{suffix}")
            # Declared sizes are attacker-controlled: stop at whichever limit comes first,
            # the entry's own declared size or what is left of the archive's budget.
            remaining = max_total_bytes - total
            try:
                with archive.open(_read_to_the_end(info)) as source:
                    total += storage.write_stream(
                        key, source, max_bytes=min(info.file_size, remaining)
                    )
                written.append(key)
            except StorageLimitError as exc:
                if info.file_size <= remaining:
                    raise IntakeError(
                        "unsafe_zip",
                        f"zip entry {info.filename!r} inflates past its declared size of "
                        f"{info.file_size} bytes (zip bomb?)",
                    ) from exc
                raise IntakeError(
                    "too_large",
                    f"the archive's images are over {max_total_bytes} bytes uncompressed",
                ) from exc
            images.append(NewImage(path=image_name(info.filename), location=storage.url_for(key)))
        return images
    except (zipfile.BadZipFile, EOFError, NotImplementedError, zipfile.LargeZipFile) as exc:
        remove_all(storage, written)
        raise IntakeError("invalid_zip", f"damaged zip archive: {exc}") from exc
    except RuntimeError as exc:  # zipfile raises it for encrypted members it can't read
        remove_all(storage, written)
        raise IntakeError("invalid_zip", f"unreadable zip entry: {exc}") from exc
    except BaseException:
        remove_all(storage, written)
        raise


def _read_to_the_end(info: zipfile.ZipInfo) -> zipfile.ZipInfo:
    """``info`` for reading the member's data to its real end, not its declared size.

    ``zipfile`` stops a member at the size the central directory declares, so a member that
    inflates further would be cut short silently (its CRC set to match the cut) instead of
    refused. With no such stop, the storage's ``max_bytes`` (the declared size, or what is left
    of the archive's budget) is the one limit, and it counts the bytes really written.
    """
    unbounded = copy.copy(info)
    unbounded.file_size = sys.maxsize
    return unbounded


class _seekable:
    """Context manager yielding a seekable stream; spools unseekable ones to a temp file.

    ``zipfile`` reads the central directory at the end of the file first, so a pipe or a
    socket stream has to be buffered; uploads normally already are (Werkzeug spools them).
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self._spool: IO[bytes] | None = None

    def __enter__(self) -> IO[bytes]:
        try:
            if self._stream.seekable():
                self._stream.seek(0)
                return self._stream
        except (AttributeError, OSError, ValueError):
            pass
        spool = tempfile.TemporaryFile()
        shutil.copyfileobj(self._stream, spool, COPY_BUFFER)
        spool.seek(0)
        self._spool = spool
        return spool

    def __exit__(self, *exc_info: object) -> None:
        if self._spool is not None:
            self._spool.close()
