"""Request and response schemas: they validate input and document every route in OpenAPI."""

from __future__ import annotations

import re
from functools import lru_cache

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
from apiflask.validators import Length, OneOf, Range
from marshmallow import RAISE, ValidationError

from face_emotions.labels import EMOTIONS

MAX_BATCH_SIZE = 1024
#: Integer columns are 32-bit: a bigger number is refused as input, not overflowed in SQL.
MAX_INT32 = 2**31 - 1
MAX_PATH_CHARS = 4096
RESULT_FORMATS = ("json", "jsonl", "csv")
RESULT_STATUSES = ("succeeded", "failed")


def validate_path_text(value: str) -> None:
    """A path-like string a filesystem and a database can hold: no NUL, no lone surrogates
    (JSON's ``"\\ud800"`` decodes to one, and neither UTF-8 nor the OS can encode it)."""
    if "\x00" in value:
        raise ValidationError("must not contain a NUL character")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValidationError("must be valid Unicode text (no lone surrogates)") from exc
    if len(value) > MAX_PATH_CHARS:
        raise ValidationError(f"must be at most {MAX_PATH_CHARS} characters")


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
        validate=Range(min=1, max=MAX_INT32),
        allow_none=True,
        metadata={"description": "Pin a registered version; default: the serving alias."},
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
    model_version = Integer(validate=Range(min=1, max=MAX_INT32), allow_none=True)


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
    image_id = Integer(
        metadata={
            "description": "JSON pages only: the image's id in "
            "/api/v1/jobs/{job_id}/images/{image_id}/thumbnail."
        }
    )


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


class ClassMetricsOut(Schema):
    precision = Float(required=True)
    recall = Float(required=True)
    f1 = Float(required=True)
    support = Integer(required=True, metadata={"description": "Test images of this class."})


class EvaluationOut(Schema):
    version = Integer(required=True)
    classes = List(String(), required=True, metadata={"description": "Row/column order."})
    confusion_matrix = List(
        List(Integer()),
        required=True,
        metadata={"description": "Rows: true class; columns: predicted class."},
    )
    num_images = Integer(required=True)
    accuracy = Float(required=True)
    weighted_f1 = Float(required=True)
    macro_f1 = Float(required=True)
    per_class = Dict(keys=String(), values=Nested(ClassMetricsOut), required=True)
    passed = Boolean(metadata={"description": "Whether it met the quality targets."})
    failures = List(String(), metadata={"description": "The targets it missed."})


class PromoteOut(Schema):
    version = Integer(required=True, metadata={"description": "The version now serving."})
    previous = Integer(
        allow_none=True, metadata={"description": "The version the alias pointed at before."}
    )
    alias = String(required=True, metadata={"description": "The serving alias that moved."})


# -- training runs --------------------------------------------------------------------------

PROMOTE_MODES = ("auto", "never", "force")
TRAINING_RUN_STATUSES = ("queued", "running", "succeeded", "failed")
MAX_EPOCHS = 500
MAX_OVERRIDES = 50
MAX_OVERRIDE_CHARS = 500
OVERRIDE_PATTERN = re.compile(r"^[A-Za-z0-9_.+~/-]+=.*$")
#: Keys the service sets itself, and the request field to use instead (None: no field).
#: ``data.path``, ``output_dir`` and ``data.hash_cache`` are paths on the trainer's disk, which a
#: request must not choose; ``hydra`` would reconfigure the framework itself. These keys and
#: everything under them are refused.
RESERVED_OVERRIDES: dict[str, str | None] = {
    "data.path": "data",
    "data.hash_cache": None,
    "promote": "promote",
    "output_dir": None,
    "hydra": None,
}
#: Config groups chosen by a field: selecting them is refused, their sub-keys are allowed
#: (``model.image_size=64`` is fine, ``model=resnet18`` must go through the validated field).
RESERVED_GROUPS: dict[str, str] = {"data": "data", "model": "model"}


@lru_cache(maxsize=1)
def known_models() -> tuple[str, ...]:
    """The model zoo's architectures; imported on first use because it imports torch."""
    from face_emotions.modeling.zoo import available_models

    return tuple(available_models())


def validate_model(name: str) -> None:
    if name not in known_models():
        raise ValidationError(f"unknown model {name!r}; choose one of: {', '.join(known_models())}")


def override_key(override: str) -> str:
    """``++training.lr=1`` -> ``training.lr``: the dotted key an override sets or deletes."""
    key = override.split("=", 1)[0].lstrip("+~")
    return key.replace("/", ".")


def validate_override(override: str) -> None:
    """One Hydra override: ``key=value``, not a key the service owns, no interpolation."""
    if len(override) > MAX_OVERRIDE_CHARS:
        raise ValidationError(f"an override is longer than {MAX_OVERRIDE_CHARS} characters")
    validate_path_text(override)  # it reaches the trainer's command line and the database
    if not OVERRIDE_PATTERN.fullmatch(override):
        raise ValidationError(
            f"{override!r} is not a Hydra override like 'training.lr=0.001' (key=value)"
        )
    key = override_key(override)
    for reserved, field in RESERVED_OVERRIDES.items():
        if key == reserved or key.startswith(reserved + "."):
            hint = f"; use the '{field}' field" if field else ""
            raise ValidationError(f"{override!r}: {reserved} is set by the service{hint}")
    if key in RESERVED_GROUPS:
        raise ValidationError(
            f"{override!r}: choose the {key} with the '{RESERVED_GROUPS[key]}' field"
        )
    if "${" in override:
        # Interpolations would resolve against the trainer's environment (oc.env:...) and
        # end up in MLflow params: a way to read the trainer's secrets.
        raise ValidationError(f"{override!r}: interpolations (${{...}}) are not allowed")


class TrainingRunIn(Schema):
    class Meta:
        unknown = RAISE

    data = String(
        required=True,
        validate=[Length(min=1), validate_path_text],
        metadata={
            "description": "Labelled folder (<Class>/images) under EMOTIONS_DATA_ROOT.",
            "example": "faces",
        },
    )
    model = String(
        validate=validate_model,
        metadata={
            "description": "Architecture: cnn, efficientnet_lite0 (default), ...",
            "example": "cnn",
        },
    )
    epochs = Integer(
        validate=Range(min=1, max=MAX_EPOCHS),
        metadata={"description": "Most epochs (early stopping may end sooner)."},
    )
    promote = String(
        load_default="auto",
        validate=OneOf(PROMOTE_MODES),
        metadata={
            "description": "auto: promote only if it beats the champion on the same test "
            "split; never: only register; force: always promote."
        },
    )
    overrides = List(
        String(validate=validate_override),
        load_default=list,
        validate=Length(max=MAX_OVERRIDES),
        metadata={"description": "More Hydra overrides, e.g. ['training.lr=0.001']."},
    )


class TrainingRunLinks(Schema):
    self = String(required=True)


class TrainingRunOut(Schema):
    id = String(required=True, metadata={"format": "uuid"})
    status = String(required=True, metadata={"enum": list(TRAINING_RUN_STATUSES)})
    requested_by = String(required=True)
    data = String(required=True, metadata={"description": "Folder under the data root."})
    promote = String(required=True, metadata={"enum": list(PROMOTE_MODES)})
    overrides = List(String(), required=True)
    attempts = Integer(required=True, metadata={"description": "> 1: restarted after a crash."})
    mlflow_run_id = String(allow_none=True)
    registered_version = Integer(allow_none=True)
    promoted = Boolean(required=True)
    promotion_reason = String(allow_none=True)
    metrics = Dict(
        keys=String(),
        allow_none=True,
        metadata={"description": "test_* metrics of the test split and passed_targets."},
    )
    error = String(allow_none=True)
    created_at = DateTime(required=True)
    started_at = DateTime(allow_none=True)
    finished_at = DateTime(allow_none=True)
    duration_seconds = Float(allow_none=True)
    links = Nested(TrainingRunLinks, required=True)


class TrainingRunCreatedOut(TrainingRunOut):
    warning = String(metadata={"description": "Set when the run could not be dispatched yet."})


class TrainingRunListItem(TrainingRunOut):
    """A run in a list (its own class for the reason given at :class:`JobListItem`)."""


class TrainingRunPageOut(Schema):
    items = List(Nested(TrainingRunListItem), required=True)
    page = Integer(required=True)
    limit = Integer(required=True)
    total = Integer(required=True)


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
