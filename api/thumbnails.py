"""``/api/v1/jobs/<id>/images/<image_id>/thumbnail``: a small JPEG of one image of a job.

The web console shows each result next to its image; a job's images live in storage the
browser cannot reach (local disk, a private bucket), so the API reads the stored image, decodes
it with the workers' safety limits and answers a re-encoded JPEG of at most
:data:`THUMBNAIL_PIXELS` on its longer side. Nothing the client sent is ever echoed back as an
image. Same rules as the results: a ``submit`` token, and another token's job is a 404. Image
ids are the ``image_id`` of the JSON results pages.

The work is :mod:`face_emotions.serving.thumbnails`: rendered once at reduced scale and kept in
the upload storage, so a console that reloads costs one small read per image, not a decode; a
local image is opened confined to the data root (a link swapped in after submission is a 403).
"""

from __future__ import annotations

import logging
import uuid

from apiflask import APIBlueprint
from apiflask import FileSchema
from flask import Response

from api.auth import SUBMIT
from api.auth import current_principal
from api.auth import require_role
from api.errors import ApiError
from api.extensions import db_session
from api.extensions import services
from api.openapi_docs import error_responses
from face_emotions.data.confined_files import OutsideRootError
from face_emotions.data.images import ImageDecodeError
from face_emotions.data.images import ImageTooLargeError
from face_emotions.data.storage import Storage
from face_emotions.jobs import job_queries
from face_emotions.jobs.schema import Image
from face_emotions.serving.thumbnails import THUMBNAIL_PIXELS
from face_emotions.serving.thumbnails import cached_thumbnail
from face_emotions.serving.thumbnails import keep_thumbnail
from face_emotions.serving.thumbnails import render_thumbnail
from face_emotions.serving.thumbnails import thumbnail_key

log = logging.getLogger(__name__)

# Its own tag: two blueprints naming the same tag would list it twice in the spec.
bp = APIBlueprint(
    "thumbnails",
    __name__,
    url_prefix="/api/v1/jobs",
    tag={"name": "images", "description": "Thumbnails of a job's images (for the console)"},
)


@bp.get("/<uuid:job_id>/images/<int:image_id>/thumbnail")
@require_role(SUBMIT)
@bp.output(
    FileSchema,
    content_type="image/jpeg",
    description=f"A JPEG of the image, at most {THUMBNAIL_PIXELS} px on its longer side",
)
@bp.doc(
    responses=error_responses(
        {
            403: "The stored image is now behind a symbolic link below the data root",
            404: "No such job, no such image in it, or the stored image is gone",
            422: "The stored image cannot be decoded (its result carries the reason), or is "
            "over EMOTIONS_THUMBNAIL_MAX_PIXELS (image_too_large)",
            503: "The storage holding the image is unreachable",
        }
    )
)
def thumbnail(job_id: uuid.UUID, image_id: int) -> Response:
    """A small JPEG of one image of a job

    `image_id` is the `image_id` of an item of the job's JSON results. Decoded with the
    workers' limits and re-encoded, so it is always a plain RGB JPEG; made once, then kept.
    """
    settings = services().settings
    session = db_session()
    job = job_queries.get_job(session, job_id, owner=current_principal().owner_filter)
    image = session.get(Image, image_id) if job is not None else None
    if job is None or image is None or image.job_id != job.id:
        raise ApiError(404, "not_found", f"job {job_id} has no image {image_id}")
    location, name = image.location, image.path
    session.commit()  # end the read transaction before the storage round trip
    storage = Storage.from_url(
        settings.resolved_storage_url, s3_endpoint_url=settings.s3_endpoint_url
    )
    key = thumbnail_key(job_id, image_id)
    data = cached_thumbnail(storage, key)
    if data is None:
        data = _render(location, name, job_id, image_id)
        keep_thumbnail(storage, key, data)
    return Response(data, mimetype="image/jpeg")


def _render(location: str, name: str, job_id: uuid.UUID, image_id: int) -> bytes:
    """The thumbnail, or the JSON error that says why there is none."""
    settings = services().settings
    try:
        return render_thumbnail(location, settings, label=name)
    except OutsideRootError as exc:
        log.warning("refused image %s of job %s: %s", image_id, job_id, exc.reason)
        raise ApiError(403, "outside_data_root", f"{name!r} cannot be shown: {exc.reason}") from exc
    except FileNotFoundError as exc:
        raise ApiError(404, "not_found", f"the stored image {name!r} is gone") from exc
    except ImageTooLargeError as exc:
        raise ApiError(
            422,
            "image_too_large",
            f"{name!r} is too large for a thumbnail: {exc.reason} (EMOTIONS_THUMBNAIL_MAX_PIXELS)",
        ) from exc
    except ImageDecodeError as exc:
        raise ApiError(422, "unreadable_image", f"{name!r} cannot be shown: {exc.reason}") from exc
    except OSError as exc:
        log.warning("cannot read image %s of job %s: %s", image_id, job_id, exc)
        raise ApiError(
            503, "storage_unavailable", "the image storage is unreachable; try again later"
        ) from exc
