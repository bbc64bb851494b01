"""Schemas of ``/api/v1/training-runs``, and the rules a requested Hydra override must follow.

The override rules live with the schema because they are input validation: a run the service
would refuse to train is refused with 400 before it is stored or queued.
"""

from __future__ import annotations

from functools import lru_cache

from apiflask import Schema
from apiflask.fields import Boolean
from apiflask.fields import Dict
from apiflask.fields import Float
from apiflask.fields import Integer
from apiflask.fields import List
from apiflask.fields import Nested
from apiflask.fields import String
from apiflask.validators import Length
from apiflask.validators import OneOf
from apiflask.validators import Range
from marshmallow import RAISE
from marshmallow import ValidationError

from api.schemas.common import LifecycleOut
from api.schemas.common import PageOut
from api.schemas.common import validate_path_text
from face_emotions.training_config import MAX_OVERRIDES
from face_emotions.training_config import OverrideError
from face_emotions.training_config import check_override

PROMOTE_MODES = ("auto", "never", "force")
TRAINING_RUN_STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
MAX_EPOCHS = 500


@lru_cache(maxsize=1)
def known_models() -> tuple[str, ...]:
    """The model zoo's architectures; imported on first use because it imports torch."""
    from face_emotions.modeling.zoo import available_models

    return tuple(available_models())


def validate_model(name: str) -> None:
    if name not in known_models():
        raise ValidationError(f"unknown model {name!r}; choose one of: {', '.join(known_models())}")


def validate_override(override: str) -> None:
    """One Hydra override, by the trainer's rules (:func:`check_override`)."""
    validate_path_text(override)  # it reaches the trainer's command line and the database
    try:
        check_override(override)
    except OverrideError as exc:
        raise ValidationError(str(exc)) from exc


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


class TrainingProgressOut(Schema):
    stage = String(
        metadata={
            "description": "preparing data, training, evaluating, quantising (the INT8 "
            "variant and its gate) or registering."
        }
    )
    epoch = Integer(metadata={"description": "1-based epoch being trained."})
    max_epochs = Integer(allow_none=True)
    step = Integer(metadata={"description": "Optimizer steps done so far."})
    total_steps = Integer(
        allow_none=True,
        metadata={"description": "Steps if every epoch runs (early stopping may end sooner)."},
    )
    metrics = Dict(
        keys=String(), values=Float(), metadata={"description": "Latest val_loss, val_acc, ..."}
    )
    eta_seconds = Float(
        allow_none=True, metadata={"description": "Upper bound: assumes no early stopping."}
    )
    epochs_trained = Integer()
    test_accuracy = Float()
    updated_at = String(metadata={"description": "When the trainer reported (UTC, ISO 8601)."})


class TrainingRunLinks(Schema):
    self = String(required=True)


class TrainingRunOut(LifecycleOut):
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
    progress = Nested(
        TrainingProgressOut,
        allow_none=True,
        metadata={"description": "The trainer's last report while the run is running."},
    )
    cancel_requested = Boolean(
        required=True, metadata={"description": "An admin asked to stop it (DELETE)."}
    )
    links = Nested(TrainingRunLinks, required=True)


class TrainingRunCreatedOut(TrainingRunOut):
    warning = String(metadata={"description": "Set when the run could not be dispatched yet."})


class TrainingRunListItem(TrainingRunOut):
    """A run in a list (its own class for the reason given at
    :class:`api.schemas.jobs.JobListItem`)."""


class TrainingRunPageOut(PageOut):
    items = List(Nested(TrainingRunListItem), required=True)
