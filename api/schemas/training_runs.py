"""Schemas of ``/api/v1/training-runs``, and the rules a requested Hydra override must follow.

The override rules live with the schema because they are input validation: a run the service
would refuse to train is refused with 400 before it is stored or queued.
"""

from __future__ import annotations

import re
from functools import lru_cache

from apiflask import Schema
from apiflask.fields import Boolean
from apiflask.fields import Dict
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
    links = Nested(TrainingRunLinks, required=True)


class TrainingRunCreatedOut(TrainingRunOut):
    warning = String(metadata={"description": "Set when the run could not be dispatched yet."})


class TrainingRunListItem(TrainingRunOut):
    """A run in a list (its own class for the reason given at
    :class:`api.schemas.jobs.JobListItem`)."""


class TrainingRunPageOut(PageOut):
    items = List(Nested(TrainingRunListItem), required=True)
