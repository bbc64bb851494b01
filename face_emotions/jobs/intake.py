"""Turn a job submission (uploaded files, a zip archive, a server-side folder) into images.

Every input here comes from an untrusted client, so each entry point is written against the
classic attacks on file intake: path traversal in names (``../x``, ``/etc/x``, ``C:\\x``),
symlinks that lead out of an allowed tree, zip bombs (a few KiB that inflate to gigabytes) and
archives with more entries than anyone would upload on purpose. A refusal is one typed
:class:`IntakeError` whose ``code`` the API returns as is, so clients can branch on it.

The module is part of the core library (no Flask): the CLI and tests use it directly, and the
API only maps :class:`IntakeError` to HTTP responses.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tempfile
import unicodedata
import zipfile
from collections.abc import Iterable, Sized
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Final

from face_emotions.data.images import IMAGE_EXTENSIONS, iter_image_files
from face_emotions.data.storage import (
    Storage,
    StorageLimitError,
    check_key,
    is_remote,
    local_path,
)
from face_emotions.jobs.job_queries import NewImage

COPY_BUFFER: Final[int] = 1024 * 1024
#: Entries smaller than this are not ratio-checked: a tiny flat-colour BMP legitimately
#: compresses several hundred to one, and ``max_total_bytes`` bounds small entries anyway.
RATIO_CHECK_MIN_BYTES: Final[int] = 1024 * 1024
MAX_NAME_CHARS: Final[int] = 150
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_DRIVE = re.compile(r"^[A-Za-z]:")
_WINDOWS_DEVICE_NAMES: Final[frozenset[str]] = frozenset(
    {"CON", "PRN", "AUX", "NUL"}
    | {f"COM{i}" for i in range(1, 10)}
    | {f"LPT{i}" for i in range(1, 10)}
)


class IntakeError(ValueError):
    """A submission refused for a reason the client can fix; ``code`` is machine-readable.

    Codes: ``unsupported_file``, ``invalid_zip``, ``unsafe_zip``, ``too_large``,
    ``too_many_images``, ``invalid_path``, ``not_found``, ``empty``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[IntakeError], tuple[str, str]]:
        return (type(self), (self.code, self.message))


@dataclass(frozen=True)
class ZipExtraction:
    """What :func:`extract_zip` kept, and how many entries it skipped on purpose."""

    images: list[NewImage]
    skipped: int = 0
    skipped_examples: list[str] = field(default_factory=list)


# -- uploads --------------------------------------------------------------------------------


def secure_name(name: str, *, default: str = "upload") -> str:
    """Reduce a client-supplied file name to a safe basename (Werkzeug's ``secure_filename``).

    Only the last path component survives (browsers and scripts send ``C:\\x\\a.png`` and
    ``../../a.png``), non-ASCII letters are folded to ASCII where possible, whitespace becomes
    ``_``, anything else outside ``[A-Za-z0-9_.-]`` is dropped, and leading dots are removed so
    nothing becomes hidden.
    """
    base = re.split(r"[/\\]", name or "")[-1]
    raw_stem, raw_suffix = os.path.splitext(base)
    stem, suffix = _clean(raw_stem), _clean(raw_suffix)
    if stem.split(".")[0].upper() in _WINDOWS_DEVICE_NAMES:
        stem = f"_{stem}"
    stem = stem[:MAX_NAME_CHARS] or default
    return f"{stem}.{suffix}" if suffix else stem


def _clean(part: str) -> str:
    part = unicodedata.normalize("NFKD", part).encode("ascii", "ignore").decode("ascii")
    return _UNSAFE_NAME_CHARS.sub("", "_".join(part.split())).strip("._")


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _unique_name(name: str, taken: set[str]) -> str:
    """``a.png``, ``a (1).png``, ``a (2).png``...; case-insensitive, as macOS/Windows disks are."""
    stem, suffix = os.path.splitext(name)
    candidate, counter = name, 0
    while candidate.casefold() in taken:
        counter += 1
        candidate = f"{stem} ({counter}){suffix}"
    taken.add(candidate.casefold())
    return candidate


def store_uploads(
    files: Iterable[tuple[str, BinaryIO]], storage: Storage, prefix: str, *, max_images: int
) -> list[NewImage]:
    """Write uploaded image files below ``prefix`` in ``storage``; ``path`` is the sanitised name.

    Every name is checked before the first byte is written, so a batch with one bad file
    leaves nothing behind; files are streamed in 1 MiB blocks (a 500 MiB upload never sits in
    memory) and, on a local disk, created exclusively, so nothing already stored is ever
    overwritten. ``location`` is the object's URL, readable by a worker on another host.
    """
    entries = list(files)
    if not entries:
        raise IntakeError("empty", "no files were uploaded")
    if len(entries) > max_images:
        raise IntakeError(
            "too_many_images", f"{len(entries)} files uploaded; at most {max_images} per job"
        )
    taken: set[str] = set()
    planned: list[tuple[str, BinaryIO]] = []
    for original, stream in entries:
        safe = secure_name(original)
        if not _has_image_extension(safe):
            allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise IntakeError(
                "unsupported_file", f"{original!r} is not an image file (allowed: {allowed})"
            )
        planned.append((_unique_name(safe, taken), stream))

    written: list[str] = []
    try:
        images: list[NewImage] = []
        for name, stream in planned:
            key = _job_key(prefix, name)
            # A failed write removes its own partial object; only finished ones are listed,
            # so an object that existed before (local exclusive create) is never deleted.
            storage.write_stream(key, stream)
            written.append(key)
            images.append(NewImage(path=name, location=storage.url_for(key)))
        return images
    except BaseException:
        _remove_all(storage, written)
        raise


# -- zip archives ---------------------------------------------------------------------------


def _unsafe_member_reason(name: str) -> str | None:
    """Why a member name could write outside the extraction directory, or None if it can't."""
    if "\x00" in name:
        return "contains a NUL byte"
    if name.startswith(("/", "\\")):
        return "is an absolute path"
    if _DRIVE.match(name):
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
    if not _has_image_extension(parts[-1]):
        return "not an image"
    return None


def extract_zip(
    stream: BinaryIO,
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
    encryption, entry count, declared sizes, per-entry compression ratio), then every byte is
    counted while inflating, because declared sizes are attacker-controlled. Files are stored
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
                max_images=max_images,
                max_total_bytes=max_total_bytes,
                max_ratio=max_ratio,
                max_entries=max_entries,
            )
            images = _extract_members(archive, members, storage, prefix, max_total_bytes)
    return ZipExtraction(images=images, skipped=skipped, skipped_examples=examples)


def _vet_members(
    archive: zipfile.ZipFile,
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
            skipped.append(info.filename)
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
            key = _job_key(prefix, f"{index:06d}{suffix}")
            # Declared sizes are attacker-controlled: stop at whichever limit comes first,
            # the entry's own declared size or what is left of the archive's budget.
            remaining = max_total_bytes - total
            try:
                with archive.open(info) as source:
                    total += storage.write_stream(
                        key, source, max_bytes=min(info.file_size, remaining)
                    )
                written.append(key)
            except StorageLimitError as exc:
                if info.file_size <= remaining:
                    raise IntakeError(
                        "unsafe_zip",
                        f"zip entry {info.filename!r} inflates past its declared size",
                    ) from exc
                raise IntakeError(
                    "too_large",
                    f"the archive's images are over {max_total_bytes} bytes uncompressed",
                ) from exc
            images.append(NewImage(path=info.filename, location=storage.url_for(key)))
        return images
    except (zipfile.BadZipFile, EOFError, NotImplementedError, zipfile.LargeZipFile) as exc:
        _remove_all(storage, written)
        raise IntakeError("invalid_zip", f"damaged zip archive: {exc}") from exc
    except RuntimeError as exc:  # zipfile raises it for encrypted members it can't read
        _remove_all(storage, written)
        raise IntakeError("invalid_zip", f"unreadable zip entry: {exc}") from exc
    except BaseException:
        _remove_all(storage, written)
        raise


class _seekable:
    """Context manager yielding a seekable stream; spools unseekable ones to a temp file.

    ``zipfile`` reads the central directory at the end of the file first, so a pipe or a
    socket stream has to be buffered; uploads normally already are (Werkzeug spools them).
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._spool: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
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


# -- server-side folders --------------------------------------------------------------------


def _check_relative(folder: str) -> PurePosixPath:
    """Reject what could name something outside the root before touching the filesystem."""
    if "\x00" in folder:
        raise IntakeError("invalid_path", "the folder contains a NUL byte")
    try:
        folder.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no filesystem can name it
        raise IntakeError("invalid_path", "the folder is not valid Unicode text") from exc
    if folder.startswith(("/", "\\")) or _DRIVE.match(folder):
        raise IntakeError(
            "invalid_path", f"{folder!r} is absolute; give a path relative to the data root"
        )
    parts = [part for part in re.split(r"[/\\]", folder) if part not in ("", ".")]
    if ".." in parts:
        raise IntakeError("invalid_path", f"{folder!r} contains '..'")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def resolve_folder(
    data_root: Path | str,
    folder: str,
    *,
    recursive: bool,
    max_images: int,
    s3_endpoint_url: str | None = None,
) -> list[NewImage]:
    """List the images of ``folder`` under ``data_root``; ``path`` is relative to the folder.

    ``data_root`` is a local directory (a path or ``file://`` URL) or an ``s3://bucket/prefix``
    URL. Either way ``folder`` is refused if it is absolute or contains ``..``, before anything
    is looked up. Locally, the folder and every image are resolved (symlinks followed) and must
    stay inside the resolved data root: a symlink planted in the shared data tree must not let
    a client read ``/etc`` or another tenant's files. ``location`` is the resolved path, so the
    worker reads exactly the file that was checked here; for S3 it is the object's URL.
    """
    relative = _check_relative(folder)
    if not isinstance(data_root, Path) and is_remote(data_root):
        storage = Storage.from_url(data_root, s3_endpoint_url=s3_endpoint_url)
        return _resolve_remote_folder(storage, relative, folder, recursive, max_images)
    root_path = local_path(data_root) if isinstance(data_root, str) else data_root
    root = Path(root_path or data_root).expanduser().resolve()
    candidate = root / relative
    try:
        target = candidate.resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise IntakeError("not_found", f"folder {folder!r} does not exist") from exc
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, permissions, names
        raise IntakeError("invalid_path", f"folder {folder!r} cannot be resolved") from exc
    if not target.is_relative_to(root):
        raise IntakeError("invalid_path", f"folder {folder!r} leads outside the data root")
    if not target.is_dir():
        raise IntakeError("not_found", f"{folder!r} is not a folder")

    try:
        found = iter_image_files(candidate, recursive=recursive)
    except OSError as exc:
        raise IntakeError("not_found", f"folder {folder!r} cannot be read") from exc
    _check_count(found, folder, recursive, max_images)
    images: list[NewImage] = []
    for path in found:
        try:
            real = path.resolve(strict=True)
        except (OSError, RuntimeError) as exc:
            raise IntakeError("invalid_path", f"{path.name!r} cannot be resolved") from exc
        shown = path.relative_to(candidate).as_posix()
        if not real.is_relative_to(root):
            raise IntakeError("invalid_path", f"{shown!r} links outside the data root")
        images.append(NewImage(path=shown, location=str(real)))
    return images


def _resolve_remote_folder(
    storage: Storage, relative: PurePosixPath, folder: str, recursive: bool, max_images: int
) -> list[NewImage]:
    """The object-store half of :func:`resolve_folder`: list keys below the folder's prefix.

    Object stores have no symlinks, so the ``..``/absolute refusals of the folder name are the
    whole containment check; hidden entries and non-images are skipped as on disk.
    """
    key = "" if relative == PurePosixPath(".") else relative.as_posix()
    try:
        if not storage.is_dir(key):
            if key and storage.exists(key):
                raise IntakeError("not_found", f"{folder!r} is not a folder")
            raise IntakeError("not_found", f"folder {folder!r} does not exist")
        keys = storage.find(key, recursive=recursive)
    except (OSError, ValueError) as exc:
        if isinstance(exc, IntakeError):
            raise
        raise IntakeError("not_found", f"folder {folder!r} cannot be read") from exc
    base = f"{key}/" if key else ""
    found: list[str] = []
    for name in keys:
        shown = name[len(base) :]
        parts = shown.split("/")
        if any(part.startswith(".") for part in parts) or not _has_image_extension(parts[-1]):
            continue
        found.append(shown)
    _check_count(found, folder, recursive, max_images)
    images: list[NewImage] = []
    for shown in found:
        try:
            location = storage.url_for(base + shown)
        except ValueError as exc:  # a key such as "a//b.png" that no path could name
            raise IntakeError("invalid_path", f"{shown!r} is not a usable object key") from exc
        images.append(NewImage(path=shown, location=location))
    return images


def _check_count(found: Sized, folder: str, recursive: bool, max_images: int) -> None:
    if not found:
        where = "in or below" if recursive else "in"
        raise IntakeError("empty", f"no image files {where} {folder!r}")
    if len(found) > max_images:
        raise IntakeError(
            "too_many_images", f"{folder!r} holds {len(found)} images; at most {max_images}"
        )


# -- helpers --------------------------------------------------------------------------------


def _job_key(prefix: str, name: str) -> str:
    """Last line of defence: names are sanitised already, but never write outside the job."""
    try:
        return check_key(f"{prefix}/{name}")
    except ValueError as exc:
        raise IntakeError("invalid_path", f"refusing to write {name!r} outside the job") from exc


def _remove_all(storage: Storage, keys: Iterable[str]) -> None:
    for key in keys:
        with contextlib.suppress(Exception):  # cleanup must not hide the error that caused it
            storage.delete(key)
