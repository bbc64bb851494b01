"""Turn a job submission (uploaded files, a zip archive, a server-side folder) into images.

Every input here comes from an untrusted client, so each entry point is written against the
classic attacks on file intake: path traversal in names (``../x``, ``/etc/x``, ``C:\\x``),
symlinks that lead out of an allowed tree, zip bombs (a few KiB that inflate to gigabytes),
archives with more entries than anyone would upload on purpose, and names whose bidi controls
make them show as another file (:func:`image_name`). A refusal is one typed
:class:`IntakeError` whose ``code`` the API returns as is, so clients can branch on it.

The module is part of the core library (no Flask): the CLI and tests use it directly, and the
API only maps :class:`IntakeError` to HTTP responses.
"""

from __future__ import annotations

import contextlib
import os
import re
import unicodedata
from collections.abc import Iterable
from typing import IO
from typing import Final

from face_emotions.data.data_root import DRIVE_LETTER
from face_emotions.data.images import IMAGE_EXTENSIONS
from face_emotions.data.storage import Storage
from face_emotions.data.storage import check_key
from face_emotions.jobs.job_queries import NewImage

COPY_BUFFER: Final[int] = 1024 * 1024
#: Entries smaller than this are not ratio-checked: a tiny flat-colour BMP legitimately
#: compresses several hundred to one, and ``max_total_bytes`` bounds small entries anyway.
RATIO_CHECK_MIN_BYTES: Final[int] = 1024 * 1024
MAX_NAME_CHARS: Final[int] = 150
#: Folders an uploaded name may keep (``a/b/c/x.png``); deeper ones keep their last folders.
MAX_DEPTH: Final[int] = 8
_UNSAFE_NAME_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
#: Unicode's bidirectional controls (embeddings, overrides, isolates, marks): invisible, they
#: reorder how the rest of a name is shown, so ``"\u202egnp.exe.png"`` reads like another file.
BIDI_CONTROLS: Final[str] = (
    "\u061c"  # Arabic letter mark
    "\u200e\u200f"  # left-to-right and right-to-left marks
    "\u202a\u202b\u202c\u202d\u202e"  # embeddings, pop, overrides
    "\u2066\u2067\u2068\u2069"  # isolates
)
_DROP_BIDI: Final[dict[int, None]] = dict.fromkeys(map(ord, BIDI_CONTROLS))
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


def secure_relative_name(name: str, *, max_depth: int = MAX_DEPTH) -> str:
    """A client-supplied relative path, made safe component by component.

    ``face-emotions submit ./faces`` uploads ``Angry/0.jpg`` and ``Fear/0.jpg``: keeping the
    folders keeps results matchable to files. Absolute roots, drive letters, ``.`` and ``..``
    are dropped (they could only lead out of the job), every folder is cleaned like a file name,
    and the last component goes through :func:`secure_name`.
    """
    parts = [p for p in re.split(r"[/\\]", name or "") if p not in ("", ".", "..")]
    if parts and DRIVE_LETTER.match(parts[0]):
        parts = parts[1:]
    if not parts:
        return secure_name(name)
    folders = [_clean(part)[:MAX_NAME_CHARS] for part in parts[:-1]]
    folders = [folder for folder in folders if folder][-(max_depth - 1) :] if max_depth > 1 else []
    return "/".join([*folders, secure_name(parts[-1])])


def _clean(part: str) -> str:
    part = unicodedata.normalize("NFKD", part).encode("ascii", "ignore").decode("ascii")
    return _UNSAFE_NAME_CHARS.sub("", "_".join(part.split())).strip("._")


def image_name(name: str) -> str:
    """The name an image is stored and shown under: the client's, without bidi controls.

    Every intake (uploads, zip entries, folder jobs' relative paths) passes its image names
    through here, so no result, export or console card shows a name spoofed by reordering.
    The name is only shown: where the file really is (``location``) never depends on it.
    """
    return name.translate(_DROP_BIDI)


def has_image_extension(name: str) -> bool:
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
    files: Iterable[tuple[str, IO[bytes]]], storage: Storage, prefix: str, *, max_images: int
) -> list[NewImage]:
    """Write uploaded image files below ``prefix`` in ``storage``; ``path`` is the sanitised
    relative name (folders kept, see :func:`secure_relative_name`).

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
    planned: list[tuple[str, IO[bytes]]] = []
    for original, stream in entries:
        safe = secure_relative_name(original)
        if not has_image_extension(safe):
            allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise IntakeError(
                "unsupported_file", f"{original!r} is not an image file (allowed: {allowed})"
            )
        planned.append((_unique_name(safe, taken), stream))

    written: list[str] = []
    try:
        images: list[NewImage] = []
        for name, stream in planned:
            key = job_key(prefix, name)
            # A failed write removes its own partial object; only finished ones are listed,
            # so an object that existed before (local exclusive create) is never deleted.
            storage.write_stream(key, stream)
            written.append(key)
            images.append(NewImage(path=image_name(name), location=storage.url_for(key)))
        return images
    except BaseException:
        remove_all(storage, written)
        raise


def job_key(prefix: str, name: str) -> str:
    """Last line of defence: names are sanitised already, but never write outside the job."""
    try:
        return check_key(f"{prefix}/{name}")
    except ValueError as exc:
        raise IntakeError("invalid_path", f"refusing to write {name!r} outside the job") from exc


def remove_all(storage: Storage, keys: Iterable[str]) -> None:
    for key in keys:
        with contextlib.suppress(Exception):  # cleanup must not hide the error that caused it
            storage.delete(key)
