"""Request and response schemas: they validate input and document every route in OpenAPI."""

from __future__ import annotations

from apiflask import Schema
from apiflask.fields import (
    Boolean,
    DateTime,
    Dict,
    File,
    Float,
    Integer,
    List,
    Nested,
    String,
)
from apiflask.validators import OneOf, Range
from marshmallow import RAISE

from human_face_emotions.labels import EMOTIONS

MAX_BATCH_SIZE = 1024
RESULT_FORMATS = ("json", "jsonl", "csv")
RESULT_STATUSES = ("succeeded", "failed")


# -- errors ---------------------------------------------------------------------------------


class ErrorDetail(Schema):
    code = String(required=True, metadata={"description": "Stable machine-readable code."})
    message = String(required=True, metadata={"description": "Human-readable explanation."})


class ErrorOut(Schema):
    error = Nested(ErrorDetail, required=True)


# -- job submission -------------------------------------------------------------------------


class _JobOptions(Schema):
    class Meta:
        unknown = RAISE

    batch_size = Integer(
        validate=Range(min=1, max=MAX_BATCH_SIZE),
        metadata={"description": "Images per forward pass (default EMOTIONS_BATCH_SIZE)."},
    )
    model_version = Integer(
        validate=Range(min=1),
        allow_none=True,
        metadata={"description": "Pin a registered version; default: the serving alias."},
    )


class JobUploadForm(_JobOptions):
    """The form fields of a multipart submission (the files are read separately)."""


class JobFolderIn(_JobOptions):
    folder = String(
        required=True,
        metadata={"description": "Folder relative to EMOTIONS_DATA_ROOT on the server."},
    )
    recursive = Boolean(load_default=True, metadata={"description": "Include sub-folders."})


class JobCreateIn(Schema):
    """Documentation of both request bodies of ``POST /api/v1/jobs``.

    ``multipart/form-data``: ``files`` (one or more images, or exactly one ``.zip``) plus
    optional ``batch_size`` and ``model_version``. ``application/json``: ``folder`` plus optional
    ``recursive``, ``batch_size`` and ``model_version``.
    """

    files = List(File(), metadata={"description": "multipart only: images or one .zip"})
    folder = String(metadata={"description": "JSON only: folder under EMOTIONS_DATA_ROOT"})
    recursive = Boolean(metadata={"description": "JSON only: include sub-folders (default true)"})
    batch_size = Integer(validate=Range(min=1, max=MAX_BATCH_SIZE))
    model_version = Integer(validate=Range(min=1), allow_none=True)


# -- jobs -----------------------------------------------------------------------------------


class JobLinks(Schema):
    self = String(required=True)
    results = String(required=True)
    summary = String(required=True)


class JobOut(Schema):
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
    total = Integer(required=True)
    done = Integer(required=True)
    failed = Integer(required=True)
    progress = Float(required=True, metadata={"description": "(done + failed) / total, 0..1."})
    model_versions = List(Integer(), metadata={"description": "Versions that made results."})
    created_at = DateTime(required=True)
    started_at = DateTime(allow_none=True)
    finished_at = DateTime(allow_none=True)
    duration_seconds = Float(allow_none=True)
    images_per_second = Float(allow_none=True)
    error = String(allow_none=True)
    links = Nested(JobLinks, required=True)


class JobCreatedOut(JobOut):
    warning = String(metadata={"description": "Set when the job could not be dispatched yet."})
    skipped = Integer(metadata={"description": "Zip entries skipped (not images, hidden...)."})


class PageQuery(Schema):
    page = Integer(load_default=1, metadata={"description": "1-based; clamped to >= 1."})
    limit = Integer(load_default=20, metadata={"description": "Clamped to 1..max page size."})


class JobListItem(JobOut):
    """A job in a list: same fields as JobOut.

    Its own class because APIFlask registers a schema used both nested and as a direct
    output twice (``JobOut`` and ``JobOut1``) when the nested use comes first.
    """


class JobPageOut(Schema):
    items = List(Nested(JobListItem), required=True)
    page = Integer(required=True)
    limit = Integer(required=True)
    total = Integer(required=True)


# -- results --------------------------------------------------------------------------------


class ResultsQuery(PageQuery):
    format = String(load_default="json", validate=OneOf(RESULT_FORMATS))
    emotion = String(
        metadata={"description": f"Only this predicted emotion ({', '.join(EMOTIONS)})."}
    )
    status = String(validate=OneOf(RESULT_STATUSES))


class ResultOut(Schema):
    image_path = String(required=True)
    status = String(required=True, metadata={"enum": list(RESULT_STATUSES)})
    predicted_class = Integer(allow_none=True)
    predicted_emotion = String(allow_none=True, metadata={"enum": list(EMOTIONS)})
    confidence = Float(allow_none=True)
    all_probabilities = Dict(keys=String(), values=Float(), allow_none=True)
    model_version = Integer(allow_none=True)
    error = String(metadata={"description": "Only for failed images."})


class ResultPageOut(Schema):
    items = List(Nested(ResultOut), required=True)
    page = Integer(required=True)
    limit = Integer(required=True)
    total = Integer(required=True)


class EmotionStats(Schema):
    count = Integer(required=True)
    mean_confidence = Float(required=True)


class SummaryOut(Schema):
    job_id = String(required=True, metadata={"format": "uuid"})
    status = String(required=True)
    total = Integer(required=True)
    done = Integer(required=True)
    failed = Integer(required=True)
    emotions = Dict(keys=String(), values=Nested(EmotionStats), required=True)


# -- models ---------------------------------------------------------------------------------


class ModelVersionOut(Schema):
    version = Integer(required=True)
    aliases = List(String(), required=True)
    architecture = String(allow_none=True)
    image_size = Integer(allow_none=True)
    accuracy = Float(allow_none=True)
    weighted_f1 = Float(allow_none=True)
    macro_f1 = Float(allow_none=True)
    created_at = DateTime(allow_none=True)
    run_id = String(allow_none=True)


class WorkerOut(Schema):
    name = String(required=True)
    model_version = Integer(allow_none=True)
    device = String(allow_none=True)
    backend = String(allow_none=True)
    images_processed = Integer(required=True)
    last_seen = DateTime(required=True)


class ModelsOut(Schema):
    model = String(required=True)
    champion = Integer(allow_none=True)
    versions = List(Nested(ModelVersionOut), required=True)
    workers = List(Nested(WorkerOut), required=True)


# -- health ---------------------------------------------------------------------------------


class HealthOut(Schema):
    status = String(required=True)


class ReadyOut(Schema):
    status = String(required=True, metadata={"enum": ["ready", "unavailable"]})
    checks = Dict(
        keys=String(),
        values=String(),
        required=True,
        metadata={"description": "database, broker, registry: 'ok' or why not."},
    )
