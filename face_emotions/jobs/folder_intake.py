"""A folder job: a folder under ``EMOTIONS_DATA_ROOT`` (a local path or an ``s3://`` prefix).

The folder comes from a client, so it must stay inside the data root: no absolute paths, no
``..``, no drive letters, and no symlink that leads out of the root.
"""

from __future__ import annotations

from collections.abc import Sized
from pathlib import Path
from pathlib import PurePosixPath

from face_emotions.data.data_root import FolderError
from face_emotions.data.data_root import relative_folder
from face_emotions.data.data_root import resolve_local_folder
from face_emotions.data.images import iter_image_files
from face_emotions.data.storage import Storage
from face_emotions.data.storage import is_remote
from face_emotions.data.storage import local_path
from face_emotions.jobs.intake import IntakeError
from face_emotions.jobs.intake import has_image_extension
from face_emotions.jobs.intake import image_name
from face_emotions.jobs.job_queries import NewImage


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
    worker reads exactly the file that was checked here; for S3 it is the object's URL. ``path``
    drops bidi controls (:func:`~face_emotions.jobs.intake.image_name`); ``location`` keeps them.
    """
    try:
        relative = relative_folder(folder)
        if not isinstance(data_root, Path) and is_remote(data_root):
            storage = Storage.from_url(data_root, s3_endpoint_url=s3_endpoint_url)
            return _resolve_remote_folder(storage, relative, folder, recursive, max_images)
        root_path = local_path(data_root) if isinstance(data_root, str) else data_root
        root, candidate = resolve_local_folder(Path(root_path or data_root), folder)
    except FolderError as exc:
        raise IntakeError(exc.code, exc.message) from exc

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
        images.append(NewImage(path=image_name(shown), location=str(real)))
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
        if any(part.startswith(".") for part in parts) or not has_image_extension(parts[-1]):
            continue
        found.append(shown)
    _check_count(found, folder, recursive, max_images)
    images: list[NewImage] = []
    for shown in found:
        try:
            location = storage.url_for(base + shown)
        except ValueError as exc:  # a key such as "a//b.png" that no path could name
            raise IntakeError("invalid_path", f"{shown!r} is not a usable object key") from exc
        images.append(NewImage(path=image_name(shown), location=location))
    return images


def _check_count(found: Sized, folder: str, recursive: bool, max_images: int) -> None:
    if not found:
        where = "in or below" if recursive else "in"
        raise IntakeError("empty", f"no image files {where} {folder!r}")
    if len(found) > max_images:
        raise IntakeError(
            "too_many_images", f"{folder!r} holds {len(found)} images; at most {max_images}"
        )
