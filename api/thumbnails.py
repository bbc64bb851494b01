"""``/api/v1/jobs/<id>/images/<image_id>/thumbnail``: a small JPEG of one image of a job.

The web console shows each result next to its image; a job's images live in storage the
browser cannot reach (local disk, a private bucket), so the API reads the stored image, decodes
it with the same safety limits as the workers (:func:`decode_image`, ``EMOTIONS_MAX_IMAGE_PIXELS``)
and answers a re-encoded JPEG of at most :data:`THUMBNAIL_PIXELS` on its longer side. Nothing
the client sent is ever echoed back as an image. Same rules as the results: a ``submit`` token,
and another token's job is a 404. Image ids are the ``image_id`` of the JSON results pages.
"""

from __future__ import annotations

import io
import logging
import uuid

from apiflask import APIBlueprint
from apiflask import FileSchema
from flask import Response
from PIL import Image as PILImage

from api.auth import SUBMIT
from api.auth import current_principal
from api.auth import require_role
from api.errors import ApiError
from api.extensions import db_session
from api.extensions import services
from api.openapi_docs import error_responses
from face_emotions.data.images import ImageDecodeError
from face_emotions.data.images import decode_image
from face_emotions.data.storage import StorageLimitError
from face_emotions.data.storage import read_location
from face_emotions.jobs import job_queries
from face_emotions.jobs.schema import Image

log = logging.getLogger(__name__)

# Its own tag: two blueprints naming the same tag would list it twice in the spec.
bp = APIBlueprint(
    "thumbnails",
    __name__,
    url_prefix="/api/v1/jobs",
    tag={"name": "images", "description": "Thumbnails of a job's images (for the console)"},
)

#: Longer side of a thumbnail: the console's cards are about 200 CSS pixels wide.
THUMBNAIL_PIXELS = 256
JPEG_QUALITY = 85
#: Headroom over the pixel limit for file headers and metadata (as the workers allow).
HEADER_ALLOWANCE = 1024 * 1024


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
            404: "No such job, no such image in it, or the stored image is gone",
            422: "The stored image cannot be decoded (its result carries the reason)",
            503: "The storage holding the image is unreachable",
        }
    )
)
def thumbnail(job_id: uuid.UUID, image_id: int) -> Response:
    """A small JPEG of one image of a job

    `image_id` is the `image_id` of an item of the job's JSON results. Decoded with the
    workers' limits and re-encoded, so it is always a plain RGB JPEG.
    """
    settings = services().settings
    session = db_session()
    job = job_queries.get_job(session, job_id, owner=current_principal().owner_filter)
    image = session.get(Image, image_id) if job is not None else None
    if job is None or image is None or image.job_id != job.id:
        raise ApiError(404, "not_found", f"job {job_id} has no image {image_id}")
    location, name = image.location, image.path
    session.commit()  # end the read transaction before the storage round trip
    try:
        data = read_location(
            location,
            s3_endpoint_url=settings.s3_endpoint_url,
            max_bytes=4 * settings.max_image_pixels + HEADER_ALLOWANCE,
        )
        picture = decode_image(data, path=name, max_pixels=settings.max_image_pixels)
    except FileNotFoundError as exc:
        raise ApiError(404, "not_found", f"the stored image {name!r} is gone") from exc
    except (ImageDecodeError, StorageLimitError) as exc:
        reason = exc.reason if isinstance(exc, ImageDecodeError) else str(exc)
        raise ApiError(422, "unreadable_image", f"{name!r} cannot be shown: {reason}") from exc
    except OSError as exc:
        log.warning("cannot read image %s of job %s: %s", image_id, job_id, exc)
        raise ApiError(
            503, "storage_unavailable", "the image storage is unreachable; try again later"
        ) from exc
    picture.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS), PILImage.Resampling.LANCZOS)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
    return Response(buffer.getvalue(), mimetype="image/jpeg")
