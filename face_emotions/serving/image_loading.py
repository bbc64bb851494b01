"""Reading one stored image for a worker: from local disk or object storage, bounded, decoded.

A job's images may live on the API's disk, a shared volume or S3; the worker reads the
location the image row holds, refuses files too large to be an image under the pixel limit
before reading them whole, and turns every failure into a per-image reason (a string), so one
bad file never fails its chunk. A local location is opened confined to the data root or the
upload storage (:func:`~face_emotions.data.confined_files.open_confined`): a file or folder
swapped for a symbolic link after the job was submitted is refused, never followed.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path

from PIL import Image as PILImage

from face_emotions.data.confined_files import OutsideRootError
from face_emotions.data.confined_files import open_confined
from face_emotions.data.images import ImageDecodeError
from face_emotions.data.images import decode_image
from face_emotions.data.storage import StorageLimitError
from face_emotions.data.storage import StorageReader
from face_emotions.data.storage import local_path
from face_emotions.settings import Settings

ImageLoader = Callable[[str, int], PILImage.Image | str]


#: Headroom over the pixel limit for file headers, metadata and embedded thumbnails.
_HEADER_ALLOWANCE = 1024 * 1024


def max_image_bytes(max_pixels: int) -> int:
    """The largest object worth downloading for an image of at most ``max_pixels`` pixels.

    Uncompressed 4-byte pixels plus headers bound every legitimate image file, so anything
    larger is refused before it is read into a worker's memory (the pixel limit only guards
    decoding, which comes after the download).
    """
    return 4 * max_pixels + _HEADER_ALLOWANCE


def local_read_roots(settings: Settings) -> tuple[Path, ...]:
    """The local directories a job's images may be read from: the data root (folder jobs) and
    the upload storage, each resolved; object-store roots have no symlinks and are left out."""
    roots = []
    for location in (settings.data_root, settings.resolved_storage_url):
        path = local_path(location)
        if path is not None:
            roots.append(Path(path).expanduser().resolve())
    return tuple(roots)


def load_stored_image(
    location: str,
    max_pixels: int,
    *,
    reader: StorageReader | None = None,
    roots: Sequence[Path] | None = None,
) -> PILImage.Image | str:
    """Decode the image at ``location`` (path, ``file://`` or ``s3://`` URL), or say why not.

    Local files are decoded straight from disk (the fast path: no copy into memory); with
    ``roots`` (what workers pass: :func:`local_read_roots`) the file is opened confined to the
    root holding it, without following any link below it, and a location under no root is
    refused. Other locations are read through the storage reader, so a worker can classify
    uploads an API on another host stored in S3, and folder jobs on an ``s3://`` data root. A
    missing or unreadable object is a per-image error, like a missing file; only a failure that
    is not about the object itself (no connection to the store at all) propagates.
    """
    try:
        path = local_path(location)
    except ValueError as exc:  # an unsupported scheme in a row written by another version
        return f"unsupported location: {exc}"
    try:
        if path is not None and roots is not None:
            with open_confined(path, roots) as handle:
                return decode_image(handle, path=path, max_pixels=max_pixels)
        if path is not None:
            return decode_image(path, max_pixels=max_pixels)
        data = (reader or StorageReader()).read_bytes(
            location, max_bytes=max_image_bytes(max_pixels)
        )
        return decode_image(data, path=location, max_pixels=max_pixels)
    except ImageDecodeError as exc:
        return exc.reason
    except StorageLimitError as exc:
        return f"file is larger than {exc.limit} bytes"
    except OutsideRootError as exc:
        return exc.reason
    except (FileNotFoundError, NotADirectoryError):
        return "file not found"
    except IsADirectoryError:
        return "is a directory, not a file"
    except PermissionError:
        return "permission denied"
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"


def storage_image_loader(settings: Settings) -> ImageLoader:
    """The :data:`ImageLoader` for ``settings``: local paths confined to its data root and
    upload storage, and URLs on its S3 endpoint."""
    reader = StorageReader(s3_endpoint_url=settings.s3_endpoint_url)
    return functools.partial(load_stored_image, reader=reader, roots=local_read_roots(settings))
