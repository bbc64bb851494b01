"""Opening a stored file so that the open itself stays inside a root, whatever the disk holds now.

A folder job's images are checked when the job is submitted (:mod:`face_emotions.jobs.
folder_intake`): each is resolved, and its real path, inside the data root, is what the job row
keeps. But the worker reads it later, and the API reads it again for every thumbnail. Whoever
can write into the shared data tree could, in between, swap a file — or one of its folders —
for a symbolic link to ``/etc/shadow`` or another tenant's photos; a plain ``open`` of the
stored path would follow it. Checking again just before opening (``realpath`` then ``open``,
or ``open`` then ``fstat``) is a race the same writer can still win.

So a local read here walks the path one component at a time from a descriptor of the root:
every folder is opened with ``O_DIRECTORY | O_NOFOLLOW`` relative to its parent's descriptor,
and the file itself with ``O_NOFOLLOW``. No symbolic link is ever followed below the root, and
what is opened is what the walk reached, so there is nothing left to race. A stored location
never needs a link below the root: intake records the resolved path. The roots themselves come
from the operator's settings and may be links.

Core library: no Flask, no Celery.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from pathlib import PurePosixPath
from typing import Final

_DIRECTORY_FLAGS: Final[int] = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: opening a FIFO planted under the root must not hang the reader; a regular file
# ignores the flag.
_FILE_FLAGS: Final[int] = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class OutsideRootError(PermissionError):
    """A read refused because it would leave the root; the message names no outside path."""

    def __init__(self, reason: str) -> None:
        super().__init__(errno.EACCES, reason)
        self.reason = reason

    def __str__(self) -> str:
        return self.reason

    def __reduce__(self) -> tuple[type[OutsideRootError], tuple[str]]:
        return (type(self), (self.reason,))


#: Why a read was refused: a link below the root (now, whatever it was at submission).
LINK_REFUSED: Final[str] = (
    "refused: a symbolic link on the way to the file (links may lead outside the data root)"
)
#: Why a read was refused: the location is under none of the roots this process may read.
OUTSIDE_REFUSED: Final[str] = "refused: the file is not inside the data root or the upload storage"


def open_confined(path: str | os.PathLike[str], roots: Sequence[Path]) -> io.BufferedReader:
    """Open the absolute ``path`` for reading, confined to the root that contains it.

    ``roots`` are resolved directories; ``path`` must lie lexically inside one of them (the
    deepest wins), else :class:`OutsideRootError`. See :func:`open_beneath` for the walk.
    """
    target = PurePosixPath(os.path.normpath(os.fspath(path)))
    containing = [
        PurePosixPath(os.fspath(root))
        for root in roots
        if target.is_absolute() and target.is_relative_to(os.fspath(root))
    ]
    if not containing:
        raise OutsideRootError(OUTSIDE_REFUSED)
    base = max(containing, key=lambda root: len(root.parts))
    return open_beneath(Path(base), target.relative_to(base))


def open_beneath(root: Path, relative: PurePosixPath | str) -> io.BufferedReader:
    """Open ``root / relative`` without following any symbolic link below ``root``.

    Raises :class:`OutsideRootError` for a link anywhere on the way (file or folder),
    ``FileNotFoundError`` for a missing component, ``IsADirectoryError`` for a folder and
    ``PermissionError``/``OSError`` as the system says; a FIFO, socket or device is refused as
    not a regular file.
    """
    parts = PurePosixPath(relative).parts
    if not parts or any(part in ("", ".", "..", "/") for part in parts):
        raise OutsideRootError(OUTSIDE_REFUSED)
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in parts[:-1]:
            inner = _open_at(part, _DIRECTORY_FLAGS, directory)
            os.close(directory)
            directory = inner
        descriptor = _open_at(parts[-1], _FILE_FLAGS, directory)
    finally:
        os.close(directory)
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, "is a directory, not a file")
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file")
        os.set_blocking(descriptor, True)
        return open(descriptor, "rb", closefd=True)
    except BaseException:
        os.close(descriptor)
        raise


def _open_at(name: str, flags: int, directory: int) -> int:
    """``openat(directory, name, flags)``, a refusal for a symbolic link in the way."""
    try:
        return os.open(name, flags, dir_fd=directory)
    except OSError as exc:
        if exc.errno == errno.ELOOP or (exc.errno == errno.ENOTDIR and _is_link(name, directory)):
            raise OutsideRootError(LINK_REFUSED) from None
        raise


def _is_link(name: str, directory: int) -> bool:
    """Only to word the error: O_DIRECTORY|O_NOFOLLOW says ENOTDIR for a link to a folder."""
    try:
        return stat.S_ISLNK(os.stat(name, dir_fd=directory, follow_symlinks=False).st_mode)
    except OSError:
        return False
