"""Folders under a data root, named by clients: confined to the root whatever the name says.

Folder jobs and training runs both take a folder relative to ``EMOTIONS_DATA_ROOT`` from an
untrusted request. The same checks apply to both, before anything is read: no NUL byte, no
absolute path or drive letter, no ``..``; and on disk the resolved folder (symlinks followed)
must still lie inside the resolved root, so a link planted in a shared data tree can't point a
job or a run at ``/etc`` or at another tenant's files. That check is at submission; a link
swapped in afterwards is refused when a job's image is read, by
:mod:`face_emotions.data.confined_files`.
"""

from __future__ import annotations

import re
from pathlib import Path
from pathlib import PurePosixPath

DRIVE_LETTER = re.compile(r"^[A-Za-z]:")


class FolderError(ValueError):
    """A folder refused; ``code`` is ``invalid_path`` (fix the name) or ``not_found``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def relative_folder(folder: str) -> PurePosixPath:
    """``folder`` as a relative path without ``..``, or :class:`FolderError`; ``.`` for the root.

    Checked on the name alone, before the filesystem (or object store) is touched.
    """
    if "\x00" in folder:
        raise FolderError("invalid_path", "the folder contains a NUL byte")
    try:
        folder.encode("utf-8")
    except UnicodeEncodeError as exc:  # a lone surrogate: no filesystem can name it
        raise FolderError("invalid_path", "the folder is not valid Unicode text") from exc
    if folder.startswith(("/", "\\")) or DRIVE_LETTER.match(folder):
        raise FolderError(
            "invalid_path", f"{folder!r} is absolute; give a path relative to the data root"
        )
    parts = [part for part in re.split(r"[/\\]", folder) if part not in ("", ".")]
    if ".." in parts:
        raise FolderError("invalid_path", f"{folder!r} contains '..'")
    return PurePosixPath(*parts) if parts else PurePosixPath(".")


def resolve_local_folder(root: Path, folder: str) -> tuple[Path, Path]:
    """(resolved root, resolved folder): an existing directory inside the root, or
    :class:`FolderError`."""
    relative = relative_folder(folder)
    resolved_root = root.expanduser().resolve()
    try:
        target = (resolved_root / relative).resolve(strict=True)
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise FolderError(
            "not_found", f"folder {folder!r} does not exist under the data root"
        ) from exc
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loops, permissions, names
        raise FolderError("invalid_path", f"folder {folder!r} cannot be resolved") from exc
    if not target.is_relative_to(resolved_root):
        raise FolderError("invalid_path", f"folder {folder!r} leads outside the data root")
    if not target.is_dir():
        raise FolderError("not_found", f"{folder!r} under the data root is not a folder")
    return resolved_root, target
