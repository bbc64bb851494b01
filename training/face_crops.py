"""``data.faces=detect``: the face of every image of a labelled folder, cropped once and cached.

A folder of photos (not tight face crops) trains a model on backgrounds unless each image is cut
to its face first, and the cut must be the one serving makes (:func:`crop_face` with the model's
:class:`CropSpec`). Detection costs tens of milliseconds an image, so crops are cached by the
file's *content* (SHA-256) and the crop settings: a second run, a renamed folder or a copy of the
data reuses them, while an edited image or another margin gets a fresh crop. The split and the
evaluation then run on the crops, so the test accuracy is measured on what the model is served.

An image with several faces gives its largest (its label names one person's emotion; the others
are usually background). An image with no face is kept whole (``no_face=keep``, which is what
serving does with such an image) or left out (``skip``); the report counts both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

from PIL import Image

from face_emotions.data.images import ImageDecodeError
from face_emotions.data.images import decode_image
from face_emotions.data.labelled_folder import LabelledImage
from face_emotions.faces.crop import CropSpec
from face_emotions.faces.crop import crop_face
from face_emotions.faces.detection import FaceDetector

log = logging.getLogger(__name__)

NO_FACE_CHOICES = ("keep", "skip")
#: Images decoded and searched per detector call.
CHUNK = 16
#: The index is saved every this many new images: an interrupted run keeps most of its work.
SAVE_EVERY = 500
_INDEX_FORMAT = "face-emotions-face-crops/1"


@dataclass
class CropReport:
    """What cropping did to a folder: logged, recorded with the run, shown in its progress."""

    images: int = 0
    cropped: int = 0
    no_face: int = 0
    several_faces: int = 0
    skipped: int = 0  # no face and no_face=skip
    cached: int = 0  # reused from an earlier run
    unreadable: list[Path] = field(default_factory=list)

    def to_dict(self) -> dict[str, int]:
        return {
            "images": self.images,
            "cropped": self.cropped,
            "no_face": self.no_face,
            "several_faces": self.several_faces,
            "skipped": self.skipped,
            "cached": self.cached,
            "unreadable": len(self.unreadable),
        }


@dataclass(frozen=True)
class CroppedFolder:
    """The items to split and train on (crops, or whole images without a face) and the file
    each crop came from (reports and fingerprints name the user's files, not the cache's)."""

    items: list[LabelledImage]
    sources: dict[Path, Path]
    report: CropReport


@dataclass
class FaceCropping:
    """``data.faces=detect`` of a run: how to crop, where the cache is, and who hears progress.

    The detector is made on first use (MTCNN loads in about a second; a run with
    ``data.faces=none`` never needs it).
    """

    spec: CropSpec
    cache_dir: Path
    detector_factory: Callable[[], FaceDetector]
    no_face: str = "keep"
    on_progress: Callable[[int, int], None] | None = None

    def crop(self, items: Sequence[LabelledImage]) -> CroppedFolder:
        return crop_labelled_images(
            items,
            self.spec,
            self.detector_factory(),
            self.cache_dir,
            no_face=self.no_face,
            on_progress=self.on_progress,
        )


def crop_key(spec: CropSpec, detector: FaceDetector) -> str:
    """Everything that changes a crop: the crop geometry and the detector's settings."""
    settings = {
        **spec.to_dict(),
        "detector": "mtcnn/facenet-pytorch-2.6",
        "min_score": detector.min_score,
        "min_face": detector.min_face,
        "max_side": detector.max_side,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def crop_labelled_images(
    items: Sequence[LabelledImage],
    spec: CropSpec,
    detector: FaceDetector,
    cache_dir: Path,
    *,
    no_face: str = "keep",
    on_progress: Callable[[int, int], None] | None = None,
    log_progress: bool = True,
) -> CroppedFolder:
    """Crop the largest face of each item (cached), as serving crops for a model of ``spec``."""
    if no_face not in NO_FACE_CHOICES:
        raise ValueError(f"data.no_face must be one of {', '.join(NO_FACE_CHOICES)}: {no_face!r}")
    folder = Path(cache_dir) / crop_key(spec, detector)
    folder.mkdir(parents=True, exist_ok=True)
    index = _load_index(folder / "index.json")
    report = CropReport(images=len(items))
    kept: list[LabelledImage] = []
    sources: dict[Path, Path] = {}
    new = 0
    done = 0
    logged_tenth = 0  # a log line per tenth of the folder: a long detection pass is not silent
    for chunk_items, outcomes in _searched(items, index, spec, detector, folder):
        for item, (digest, entry, fresh) in zip(chunk_items, outcomes, strict=True):
            done += 1
            if entry is None:
                report.unreadable.append(item.path)
                continue
            if fresh:
                index[digest] = entry
                new += 1
            else:
                report.cached += 1
            found = int(entry["faces_found"])
            report.several_faces += found > 1
            if found == 0:
                report.no_face += 1
                if no_face == "skip":
                    report.skipped += 1
                    continue
                path = item.path  # whole image, as serving classifies an image without a face
            else:
                report.cropped += 1
                path = folder / f"{digest}.png"
                sources[path] = item.path
            kept.append(LabelledImage(path, item.label))
        if new >= SAVE_EVERY:
            _save_index(folder / "index.json", index)
            new = 0
        if on_progress is not None:
            on_progress(done, len(items))
        tenth = done * 10 // max(len(items), 1)
        if log_progress and tenth != logged_tenth:
            logged_tenth = tenth
            log.info("face detection: %d of %d images", done, len(items))
    _save_index(folder / "index.json", index)
    if report.unreadable:
        log.warning(
            "%d images could not be read for face detection (first: %s)",
            len(report.unreadable),
            report.unreadable[0],
        )
    log.info(
        "faces: %d of %d images cropped to their face (%d reused from the cache in %s); "
        "%d with several faces (largest used); %d without a face (%s)",
        report.cropped,
        report.images,
        report.cached,
        folder,
        report.several_faces,
        report.no_face,
        "left out" if no_face == "skip" else "kept whole",
    )
    return CroppedFolder(kept, sources, report)


Outcome = tuple[str, dict[str, Any] | None, bool]  # content digest, index entry, newly made


def _searched(
    items: Sequence[LabelledImage],
    index: dict[str, dict[str, Any]],
    spec: CropSpec,
    detector: FaceDetector,
    folder: Path,
) -> Iterator[tuple[Sequence[LabelledImage], list[Outcome]]]:
    """Chunks of items with their outcome: from the index when the content was seen before,
    else decoded (in threads: Pillow releases the GIL), detected and cropped now."""
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="crop-decode") as pool:
        for start in range(0, len(items), CHUNK):
            chunk = items[start : start + CHUNK]
            loaded = list(pool.map(_read, [item.path for item in chunk]))
            outcomes: list[Outcome | None] = [None] * len(chunk)
            pending: list[tuple[int, str, Image.Image]] = []
            for position, (digest, image) in enumerate(loaded):
                entry = index.get(digest) if digest else None
                if entry is not None and _crop_present(folder, digest, entry):
                    outcomes[position] = (digest, entry, False)
                elif image is None:
                    outcomes[position] = (digest, None, False)
                else:
                    pending.append((position, digest, image))
            if pending:
                found = detector.detect_many([image for _, _, image in pending])
                for (position, digest, image), faces in zip(pending, found, strict=True):
                    entry = {"faces_found": len(faces), "box": None}
                    if faces:
                        entry["box"] = [round(v, 1) for v in faces[0].box]
                        _save_png(crop_face(image, faces[0], spec), folder / f"{digest}.png")
                    outcomes[position] = (digest, entry, True)
            yield chunk, [outcome for outcome in outcomes if outcome is not None]


def _read(path: Path) -> tuple[str, Image.Image | None]:
    try:
        data = path.read_bytes()
    except OSError:
        return "", None
    digest = hashlib.sha256(data).hexdigest()[:32]
    try:
        return digest, decode_image(data, path=str(path))
    except ImageDecodeError:
        return digest, None


def _crop_present(folder: Path, digest: str, entry: dict[str, Any]) -> bool:
    return entry.get("faces_found") == 0 or (folder / f"{digest}.png").is_file()


def _save_png(image: Image.Image, path: Path) -> None:
    """Written under a temporary name first: a crop file is whole or absent."""
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_index(path: Path) -> dict[str, dict[str, Any]]:
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(payload, dict) or payload.get("format") != _INDEX_FORMAT:
        return {}
    entries = payload.get("entries")
    return entries if isinstance(entries, dict) else {}


def _save_index(path: Path, entries: dict[str, dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump({"format": _INDEX_FORMAT, "entries": entries}, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
