"""Schemas of ``/api/v1/jobs``: submission options, jobs, their results and summaries."""

from __future__ import annotations

from apiflask import Schema
from apiflask.fields import Boolean
from apiflask.fields import Dict
from apiflask.fields import Float
from apiflask.fields import Integer
from apiflask.fields import List
from apiflask.fields import Nested
from apiflask.fields import String
from apiflask.validators import OneOf
from apiflask.validators import Range
from apiflask.validators import Regexp
from marshmallow import RAISE

from api.schemas.common import MAX_INT32
from api.schemas.common import LifecycleOut
from api.schemas.common import PageOut
from api.schemas.common import PageQuery
from api.schemas.common import validate_path_text
from face_emotions.faces.crop import FACE_POLICIES
from face_emotions.labels import EMOTIONS

MAX_BATCH_SIZE = 1024
RESULT_FORMATS = ("json", "jsonl", "csv")
RESULT_STATUSES = ("succeeded", "failed")


# -- job submission -------------------------------------------------------------------------


class _JobOptions(Schema):
    class Meta:
        unknown = RAISE

    batch_size = Integer(
        validate=Range(min=1, max=MAX_BATCH_SIZE),
        metadata={"description": "Images per forward pass (default EMOTIONS_BATCH_SIZE)."},
    )
    model_version = Integer(
        validate=Range(min=1, max=MAX_INT32),
        allow_none=True,
        metadata={"description": "Pin a registered version; default: the serving alias."},
    )
    faces = String(
        validate=OneOf(FACE_POLICIES),
        metadata={
            "description": "all: classify every face; largest: the largest face only; none: the "
            "whole image, no detection. Default EMOTIONS_FACES (all)."
        },
    )


class JobUploadForm(_JobOptions):
    """The form fields of a multipart submission (the files are read separately)."""


class JobFolderIn(_JobOptions):
    folder = String(
        required=True,
        validate=validate_path_text,
        metadata={"description": "Folder relative to EMOTIONS_DATA_ROOT on the server."},
    )
    recursive = Boolean(load_default=True, metadata={"description": "Include sub-folders."})


# -- jobs -----------------------------------------------------------------------------------


class JobLinks(Schema):
    self = String(required=True)
    results = String(required=True)
    summary = String(required=True)


class JobOut(LifecycleOut):
    id = String(required=True, metadata={"format": "uuid"})
    status = String(
        required=True,
        metadata={
            "enum": [
                "queued",
                "running",
                "succeeded",
                "completed_with_errors",
                "failed",
                "cancelled",
            ]
        },
    )
    source_type = String(required=True, metadata={"enum": ["upload", "zip", "folder"]})
    source = String(required=True)
    batch_size = Integer(required=True)
    model_version = Integer(allow_none=True, metadata={"description": "Pinned version or null."})
    face_policy = String(
        required=True, metadata={"enum": list(FACE_POLICIES), "description": "all, largest, none."}
    )
    total = Integer(required=True)
    done = Integer(required=True)
    failed = Integer(required=True)
    progress = Float(required=True, metadata={"description": "(done + failed) / total, 0..1."})
    model_versions = List(Integer(), metadata={"description": "Versions that made results."})
    images_per_second = Float(allow_none=True)
    error = String(allow_none=True)
    links = Nested(JobLinks, required=True)


class JobCreatedOut(JobOut):
    warning = String(metadata={"description": "Set when the job could not be dispatched yet."})
    skipped = Integer(metadata={"description": "Zip entries skipped (not images, hidden...)."})
    skipped_files = List(
        String(),
        metadata={"description": "The first skipped entries' names (at most 10), to check."},
    )


class JobListItem(JobOut):
    """A job in a list: same fields as JobOut.

    Its own class because APIFlask registers a schema used both nested and as a direct
    output twice (``JobOut`` and ``JobOut1``) when the nested use comes first.
    """


class JobPageOut(PageOut):
    items = List(Nested(JobListItem), required=True)


# -- results --------------------------------------------------------------------------------


#: The longest a status request may wait for its job to end (below the clients' timeouts).
MAX_JOB_WAIT_SECONDS = 30.0


class JobQuery(Schema):
    wait = Float(
        load_default=0.0,
        validate=Range(min=0, max=MAX_JOB_WAIT_SECONDS),
        metadata={
            "description": "Seconds to wait for the job to end (succeeded, failed or "
            f"cancelled) before answering, at most {MAX_JOB_WAIT_SECONDS:.0f}; 0 (default) "
            "answers at once. The answer comes within 0.05 s of the job's end, and a "
            "finished job answers at once: one waiting request instead of many polls, which "
            "leaves the cores to the workers."
        },
    )


class JobListQuery(PageQuery):
    id_prefix = String(
        validate=Regexp(
            r"^[0-9a-fA-F-]{4,36}$", error="id_prefix is 4-36 hex digits (hyphens allowed)"
        ),
        metadata={"description": "Only jobs whose id starts with these hex digits (short ids)."},
    )


class ResultsQuery(PageQuery):
    format = String(load_default="json", validate=OneOf(RESULT_FORMATS))
    emotion = String(
        metadata={"description": f"Only this predicted emotion ({', '.join(EMOTIONS)})."}
    )
    status = String(validate=OneOf(RESULT_STATUSES))
    no_face = Boolean(
        metadata={
            "description": "true: only images where no face was found (classified whole); "
            "false: only images with at least one face."
        }
    )


class FaceOut(Schema):
    index = Integer(required=True, metadata={"description": "0 is the largest face."})
    box = List(
        Integer(),
        required=True,
        metadata={
            "description": "[x0, y0, x1, y1] in the original image's pixels (after EXIF "
            "rotation); the whole image when whole_image is true."
        },
    )
    score = Float(allow_none=True, metadata={"description": "Detector confidence."})
    landmarks = List(
        List(Float()),
        allow_none=True,
        metadata={"description": "Eyes, nose, mouth corners as [x, y]."},
    )
    whole_image = Boolean(
        required=True, metadata={"description": "No face was found, or detection was off."}
    )
    predicted_class = Integer(required=True)
    predicted_emotion = String(required=True, metadata={"enum": list(EMOTIONS)})
    confidence = Float(required=True)
    all_probabilities = Dict(keys=String(), values=Float(), required=True)


class ResultOut(Schema):
    image_path = String(required=True)
    status = String(required=True, metadata={"enum": list(RESULT_STATUSES)})
    predicted_class = Integer(allow_none=True)
    predicted_emotion = String(allow_none=True, metadata={"enum": list(EMOTIONS)})
    confidence = Float(allow_none=True)
    all_probabilities = Dict(keys=String(), values=Float(), allow_none=True)
    model_version = Integer(allow_none=True)
    faces_found = Integer(
        allow_none=True,
        metadata={
            "description": "Faces the detector found; 0: none (the whole image was "
            "classified); null: detection did not run."
        },
    )
    image_size = List(
        Integer(),
        allow_none=True,
        metadata={
            "description": "[width, height] of the image (after EXIF rotation): the "
            "frame of the faces' boxes."
        },
    )
    faces = List(
        Nested(FaceOut),
        metadata={
            "description": "Every classified face, largest first; the image-level "
            "fields describe the first."
        },
    )
    error = String(metadata={"description": "Only for failed images."})
    image_id = Integer(
        metadata={
            "description": "JSON pages only: the image's id in "
            "/api/v1/jobs/{job_id}/images/{image_id}/thumbnail."
        }
    )


class ResultPageOut(PageOut):
    items = List(Nested(ResultOut), required=True)


class EmotionStats(Schema):
    count = Integer(required=True)
    mean_confidence = Float(required=True)


class FaceStats(Schema):
    faces = Integer(required=True, metadata={"description": "Faces found over all images."})
    images_without_face = Integer(required=True)
    images_with_several_faces = Integer(required=True)
    not_searched = Integer(
        required=True, metadata={"description": "Images classified without detection."}
    )


class SummaryOut(Schema):
    job_id = String(required=True, metadata={"format": "uuid"})
    status = String(required=True)
    total = Integer(required=True)
    done = Integer(required=True)
    failed = Integer(required=True)
    emotions = Dict(
        keys=String(),
        values=Nested(EmotionStats),
        required=True,
        metadata={"description": "Per image (its largest face)."},
    )
    faces = Nested(FaceStats, required=True)
