"""Thumbnails of a job's images: made once, as cheaply as the codec allows, then kept.

The web console asks for a thumbnail of every image it shows, again on every visit, and each
request used to decode the full image in an API worker: 2.4 s for a 6000 x 6000 photo, time
in which that worker answers nothing else (``/healthz`` included). Now:

* a thumbnail is rendered once per image and kept in the upload storage
  (``EMOTIONS_STORAGE_URL``) under ``thumbnails/<job_id>/<image_id>-<size>.jpg``, so every
  later request is one small read; the job id in the key keeps a thumbnail from ever being
  served for another job's image;
* rendering decodes at reduced scale where the codec can (JPEG: 1/8 of a 6000 x 6000 photo,
  see :func:`~face_emotions.data.images.decode_preview`), and refuses images that would still
  decode more than ``EMOTIONS_THUMBNAIL_MAX_PIXELS`` pixels;
* a local image is opened confined to the data root or the upload storage, like the workers
  read it (:func:`~face_emotions.serving.image_loading.local_read_roots`).

Core library: no Flask, no Celery.
"""

from __future__ import annotations

import errno
import io
import logging
import uuid
from typing import Final

from PIL import Image as PILImage

from face_emotions.data.confined_files import open_confined
from face_emotions.data.images import ImageDecodeError
from face_emotions.data.images import decode_preview
from face_emotions.data.storage import Storage
from face_emotions.data.storage import StorageLimitError
from face_emotions.data.storage import local_path
from face_emotions.data.storage import read_location
from face_emotions.serving.image_loading import local_read_roots
from face_emotions.serving.image_loading import max_image_bytes
from face_emotions.settings import Settings

log = logging.getLogger(__name__)

#: Longer side of a thumbnail: the console's cards are about 200 CSS pixels wide.
THUMBNAIL_PIXELS: Final[int] = 256
JPEG_QUALITY: Final[int] = 85
#: A kept thumbnail larger than this is not one of ours (a 256 px JPEG is about 20 KB).
MAX_THUMBNAIL_BYTES: Final[int] = 1024 * 1024
_JPEG_START: Final[bytes] = b"\xff\xd8"
_JPEG_END: Final[bytes] = b"\xff\xd9"


def thumbnail_key(job_id: uuid.UUID, image_id: int, size: int = THUMBNAIL_PIXELS) -> str:
    """Storage key of one image's thumbnail; beside ``jobs/<job_id>/``, never inside it (an
    upload may have any name)."""
    return f"thumbnails/{job_id}/{image_id}-{size}.jpg"


def cached_thumbnail(storage: Storage, key: str) -> bytes | None:
    """The kept thumbnail, or None: not made yet, unreadable, or cut short.

    A local copy is written in place, so a request racing the first one could read half of it;
    a JPEG that does not end with its end-of-image marker is not served. One left behind by a
    crash is removed, so the next render can keep its own.
    """
    try:
        data = storage.read_bytes(key, max_bytes=MAX_THUMBNAIL_BYTES)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # StorageLimitError is a ValueError
        log.warning("cannot read the kept thumbnail %s: %s", key, exc)
        return None
    if data.startswith(_JPEG_START) and data.endswith(_JPEG_END):
        return data
    _forget(storage, key)
    return None


def render_thumbnail(
    location: str, settings: Settings, *, label: str, size: int = THUMBNAIL_PIXELS
) -> bytes:
    """A JPEG of the image at ``location``, at most ``size`` px on its longer side.

    Raises :class:`~face_emotions.data.images.ImageDecodeError` (its subclass
    ``ImageTooLargeError`` over ``EMOTIONS_THUMBNAIL_MAX_PIXELS``) for an image that cannot be
    shown, :class:`~face_emotions.data.confined_files.OutsideRootError` for a link below the
    root, ``FileNotFoundError`` for a missing one, other ``OSError``\\s when storage fails.
    """

    def decode(source: bytes | io.BufferedReader) -> PILImage.Image:
        return decode_preview(
            source,
            size=size,
            max_decoded_pixels=settings.thumbnail_max_pixels,
            path=label,
            max_pixels=settings.max_image_pixels,
        )

    path = local_path(location)
    try:
        if path is not None:
            with open_confined(path, local_read_roots(settings)) as handle:
                picture = decode(handle)
        else:
            picture = decode(
                read_location(
                    location,
                    s3_endpoint_url=settings.s3_endpoint_url,
                    max_bytes=max_image_bytes(settings.max_image_pixels),
                )
            )
    except NotADirectoryError as exc:  # a file where the path has a folder: the image is gone
        raise FileNotFoundError(errno.ENOENT, "file not found") from exc
    except StorageLimitError as exc:
        raise ImageDecodeError(label, f"file is larger than {exc.limit} bytes") from exc
    except OSError as exc:
        if exc.errno in (errno.EISDIR, errno.EINVAL):  # a folder, FIFO or device, not a file
            raise ImageDecodeError(label, "not a regular file") from exc
        raise
    picture.thumbnail((size, size), PILImage.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return buffer.getvalue()


def keep_thumbnail(storage: Storage, key: str, data: bytes) -> None:
    """Store a rendered thumbnail for the next request; a failure costs only a re-render.

    Local writes are exclusive: when two first requests race, the first kept copy stays.
    """
    try:
        storage.write_bytes(key, data)
    except FileExistsError:
        pass
    except Exception as exc:  # a full disk or an unreachable bucket must not fail the request
        log.warning("cannot keep the thumbnail %s: %s", key, exc)


def _forget(storage: Storage, key: str) -> None:
    try:
        storage.delete(key)
    except Exception as exc:
        log.warning("cannot remove the damaged thumbnail %s: %s", key, exc)
