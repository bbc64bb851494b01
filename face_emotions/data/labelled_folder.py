"""Turn a ``data/<Class>/<image>`` folder into labelled items for training.

Real-world emotion datasets come with inconsistent folder names ("Suprise", "HAPPY",
"fear") and with extra classes the model does not have ("Contempt", "Neutral"). This module
maps the former onto the fixed five classes and reports the latter loudly instead of
silently growing a sixth output or dropping data without a trace.
"""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
from dataclasses import dataclass
from dataclasses import field

from face_emotions.data.images import iter_image_files
from face_emotions.labels import ALIASES
from face_emotions.labels import EMOTIONS
from face_emotions.labels import canonical_emotion
from face_emotions.labels import class_index

logger = logging.getLogger(__name__)

_FINGERPRINT_SCHEME = "face_emotions.data.labelled_folder/v1"


class DatasetError(ValueError):
    """The folder cannot produce a usable training set; the message says how to fix it."""


@dataclass(frozen=True)
class LabelledImage:
    """One training example: where the file is and its class index into ``EMOTIONS``."""

    path: pathlib.Path
    label: int


@dataclass
class ScanResult:
    """Everything a training run needs to know (and log) about the data it was given."""

    items: list[LabelledImage]
    class_counts: dict[str, int]
    unknown_folders: dict[str, int]
    folder_map: dict[str, str]
    root: pathlib.Path | None = field(default=None)

    def fingerprint(self) -> str:
        """Hash the data set's identity so the model registry can tell which data a model saw.

        Covers each file's path relative to ``root`` (or the path as stored when no root is
        known), its size and its label, plus the class vocabulary so that relabelling or
        reordering classes changes the fingerprint. File contents are not read: hashing
        gigabytes for every training run is too slow, and size catches most replacements.
        """
        records = []
        for item in self.items:
            try:
                size = item.path.stat().st_size
            except OSError as exc:
                raise DatasetError(
                    f"cannot fingerprint {item.path}: {exc.strerror or exc}"
                ) from exc
            records.append((self._relative(item.path), size, item.label))
        records.sort()

        digest = hashlib.sha256()
        digest.update(f"{_FINGERPRINT_SCHEME}\0{'|'.join(EMOTIONS)}\0".encode())
        for relative, size, label in records:
            digest.update(f"{relative}\0{size}\0{label}\0".encode("utf-8", "surrogateescape"))
        return digest.hexdigest()

    def _relative(self, path: pathlib.Path) -> str:
        if self.root is not None:
            try:
                return path.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return path.as_posix()


def scan_labelled_folder(root: str | os.PathLike[str], *, recursive: bool = True) -> ScanResult:
    """Scan ``root/<Class>/...`` and label every image by its top-level folder name.

    Folders that alias the same class ("Surprise" and "Suprise") are merged; unknown folders
    are skipped and logged with their image counts. Raises :class:`DatasetError` when the
    root is unusable or not a single image of a known class was found.
    """
    top = pathlib.Path(root)
    if not top.exists():
        raise DatasetError(f"dataset root {top} does not exist")
    if not top.is_dir():
        raise DatasetError(f"dataset root {top} is not a directory")

    items: list[LabelledImage] = []
    class_counts = dict.fromkeys(EMOTIONS, 0)
    unknown_folders: dict[str, int] = {}
    folder_map: dict[str, str] = {}
    seen_folders: list[str] = []

    for folder in _class_folders(top):
        seen_folders.append(folder.name)
        files = iter_image_files(folder, recursive=recursive)
        canonical = canonical_emotion(folder.name)
        if canonical is None:
            unknown_folders[folder.name] = len(files)
            continue
        folder_map[folder.name] = canonical
        class_counts[canonical] += len(files)
        label = class_index(canonical)
        items.extend(LabelledImage(path=path, label=label) for path in files)

    loose = iter_image_files(top, recursive=False)
    if loose:
        logger.warning(
            "ignoring %d image file(s) directly under %s: images must sit in a class folder",
            len(loose),
            top,
        )
    items.sort(key=lambda item: item.path.parts)
    _log_findings(top, unknown_folders, folder_map, class_counts)

    if not items:
        seen = ", ".join(sorted(seen_folders)) if seen_folders else "none"
        raise DatasetError(
            f"no images of a known class under {top}; folders seen: {seen}; "
            f"expected folders named after {', '.join(EMOTIONS)} "
            f"(aliases accepted: {', '.join(sorted(ALIASES))})"
        )
    return ScanResult(
        items=items,
        class_counts=class_counts,
        unknown_folders=unknown_folders,
        folder_map=folder_map,
        root=top,
    )


def _class_folders(top: pathlib.Path) -> list[pathlib.Path]:
    """Top-level, non-hidden, real directories (symlinks skipped, like iter_image_files)."""
    folders = []
    with os.scandir(top) as entries:
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir(follow_symlinks=False):
                folders.append(top / entry.name)
            elif entry.is_symlink() and entry.is_dir():
                logger.warning("skipping symlinked folder %s: links are not followed", entry.path)
    return sorted(folders, key=lambda folder: folder.name)


def _log_findings(
    top: pathlib.Path,
    unknown_folders: dict[str, int],
    folder_map: dict[str, str],
    class_counts: dict[str, int],
) -> None:
    if unknown_folders:
        listing = ", ".join(f"{name!r} ({count} images)" for name, count in unknown_folders.items())
        logger.warning(
            "skipping %d unknown class folder(s) under %s: %s; known classes are %s",
            len(unknown_folders),
            top,
            listing,
            ", ".join(EMOTIONS),
        )
    for canonical in EMOTIONS:
        merged = [name for name, target in folder_map.items() if target == canonical]
        if len(merged) > 1:
            logger.info("merging folders %s into class %s", ", ".join(merged), canonical)
    empty = [name for name, count in class_counts.items() if count == 0]
    if empty and any(class_counts.values()):
        logger.warning("no images found for class(es): %s", ", ".join(empty))
