"""Tables: a job has images; an image has at most one result (its primary key is the image id).

The one-result-per-image rule is what makes redelivered or repeated chunk tasks harmless: a
second write of the same image is an ``ON CONFLICT DO NOTHING`` and changes no counter.
``training_runs`` records the runs asked for through the API and what the trainer made of them.
``api_tokens`` holds the API's bearer tokens, hashed (see :mod:`face_emotions.jobs.tokens`).
"""

from __future__ import annotations

import uuid
from datetime import UTC
from datetime import datetime
from enum import StrEnum
from typing import Any
from typing import ClassVar

from sqlalchemy import JSON
from sqlalchemy import BigInteger
from sqlalchemy import Boolean
from sqlalchemy import DateTime
from sqlalchemy import Float
from sqlalchemy import ForeignKey
from sqlalchemy import Index
from sqlalchemy import Integer
from sqlalchemy import MetaData
from sqlalchemy import SmallInteger
from sqlalchemy import String
from sqlalchemy import Text
from sqlalchemy import UniqueConstraint
from sqlalchemy import Uuid
from sqlalchemy.orm import DeclarativeBase
from sqlalchemy.orm import Mapped
from sqlalchemy.orm import mapped_column
from sqlalchemy.orm import relationship

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# SQLite only auto-increments INTEGER PRIMARY KEY; PostgreSQL gets a BIGINT identity.
BigIntId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map: ClassVar[dict[Any, Any]] = {
        datetime: DateTime(timezone=True),
        dict[str, Any]: JSON,
    }


class JobStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    COMPLETED_WITH_ERRORS = "completed_with_errors"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL_STATUSES = frozenset(
    {
        JobStatus.SUCCEEDED,
        JobStatus.COMPLETED_WITH_ERRORS,
        JobStatus.FAILED,
        JobStatus.CANCELLED,
    }
)
ACTIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("owner", "idempotency_key", name="uq_jobs_owner_idempotency_key"),
        Index("ix_jobs_created_at", "created_at"),
        Index("ix_jobs_status", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    status: Mapped[str] = mapped_column(String(32), default=JobStatus.QUEUED)
    source_type: Mapped[str] = mapped_column(String(16))  # upload | zip | folder
    source: Mapped[str] = mapped_column(Text)  # folder path, zip name or "N files"
    owner: Mapped[str] = mapped_column(String(64), default="")  # token id; "" when auth is off
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    batch_size: Mapped[int] = mapped_column(Integer)
    model_version: Mapped[int | None] = mapped_column(Integer)  # pinned version, else alias
    #: Which regions of each image are classified: all faces, the largest, or none (whole).
    face_policy: Mapped[str] = mapped_column(String(8), default="all", server_default="all")
    total: Mapped[int] = mapped_column(Integer, default=0)
    done: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    chunks: Mapped[int] = mapped_column(Integer, default=0)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    # Last time a chunk of this job made progress; the recovery sweeper looks at it.
    progressed_at: Mapped[datetime | None]

    images: Mapped[list[Image]] = relationship(back_populates="job", passive_deletes=True)


class Image(Base):
    __tablename__ = "images"
    __table_args__ = (
        UniqueConstraint("job_id", "position", name="uq_images_job_id_position"),
        Index("ix_images_job_id_chunk", "job_id", "chunk"),
    )

    id: Mapped[int] = mapped_column(BigIntId, primary_key=True, autoincrement=True)
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)  # order within the job
    chunk: Mapped[int] = mapped_column(Integer)  # task that owns this image
    path: Mapped[str] = mapped_column(Text)  # what the user sees (relative path / file name)
    location: Mapped[str] = mapped_column(Text)  # where the worker reads it (path or URL)
    attempts: Mapped[int] = mapped_column(SmallInteger, default=0)

    job: Mapped[Job] = relationship(back_populates="images")
    result: Mapped[Result | None] = relationship(back_populates="image", uselist=False)


class Result(Base):
    __tablename__ = "results"
    __table_args__ = (Index("ix_results_job_id_emotion", "job_id", "predicted_emotion"),)

    image_id: Mapped[int] = mapped_column(
        BigIntId, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True
    )
    job_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(String(16))  # succeeded | failed
    predicted_class: Mapped[int | None] = mapped_column(SmallInteger)
    predicted_emotion: Mapped[str | None] = mapped_column(String(16))
    confidence: Mapped[float | None] = mapped_column(Float)
    probabilities: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    model_version: Mapped[int | None] = mapped_column(Integer)
    worker: Mapped[str | None] = mapped_column(String(255))
    # Size of the forward pass that produced this prediction: shows micro-batching at work.
    forward_batch: Mapped[int | None] = mapped_column(Integer)
    #: Every face classified in the image (box, score, landmarks, prediction), largest first;
    #: the image-level fields above describe the first. One whole-image entry when there was
    #: no face or no detection.
    faces: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON)
    #: Faces the detector found: 0 means none (the whole image was classified); NULL means
    #: detection did not run (policy none, failed images, results from before detection).
    faces_found: Mapped[int | None] = mapped_column(Integer)
    #: The decoded image's size (after EXIF rotation): the frame the faces' boxes are in.
    image_width: Mapped[int | None] = mapped_column(Integer)
    image_height: Mapped[int | None] = mapped_column(Integer)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    image: Mapped[Image] = relationship(back_populates="result")


class WorkerState(Base):
    """What each worker process serves, so the API can say which versions are live."""

    __tablename__ = "workers"

    name: Mapped[str] = mapped_column(String(255), primary_key=True)
    model_version: Mapped[int | None] = mapped_column(Integer)
    device: Mapped[str | None] = mapped_column(String(32))
    backend: Mapped[str | None] = mapped_column(String(16))
    images_processed: Mapped[int] = mapped_column(BigInteger, default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen: Mapped[datetime] = mapped_column(default=utcnow)
    #: ``inference`` (a pool process or a worker's main process) or ``training`` (a trainer).
    role: Mapped[str] = mapped_column(String(16), default="inference", server_default="inference")
    #: The data root the process reads folders from (trainers), to notice a mismatch.
    data_root: Mapped[str | None] = mapped_column(Text)
    #: ``idle`` or ``busy`` (inference processes; trainers leave it empty).
    state: Mapped[str | None] = mapped_column(String(8))


class TrainingRunStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TRAINING_TERMINAL_STATUSES = frozenset(
    {TrainingRunStatus.SUCCEEDED, TrainingRunStatus.FAILED, TrainingRunStatus.CANCELLED}
)


class TrainingRun(Base):
    """A training run requested through the API and executed by the ``trainer`` service.

    The row is the contract between the two: the API writes what to train (``overrides``,
    ``data_path``, ``promote``), the trainer writes what came of it. Its status only moves
    forward (queued -> running -> succeeded | failed | cancelled), which is what lets a
    redelivered task recognise a finished run and do nothing.
    """

    __tablename__ = "training_runs"
    __table_args__ = (
        Index("ix_training_runs_created_at", "created_at"),
        Index("ix_training_runs_status", "status"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    status: Mapped[str] = mapped_column(String(16), default=TrainingRunStatus.QUEUED)
    requested_by: Mapped[str] = mapped_column(String(64), default="")
    # Hydra override strings from the request (model, epochs and the free-form ones); the
    # trainer appends data.path, promote and output_dir itself.
    overrides: Mapped[list[str]] = mapped_column(JSON, default=list)
    data_path: Mapped[str] = mapped_column(Text)  # relative to the data root, as requested
    promote: Mapped[str] = mapped_column(String(8), default="auto")  # auto | never | force
    mlflow_run_id: Mapped[str | None] = mapped_column(String(64))
    registered_version: Mapped[int | None] = mapped_column(Integer)
    promoted: Mapped[bool] = mapped_column(Boolean, default=False)
    promotion_reason: Mapped[str | None] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None]
    error: Mapped[str | None] = mapped_column(Text)
    #: The trainer's last report: epoch, steps, latest validation metrics, ETA (see
    #: :mod:`face_emotions.jobs.training_runs`).
    progress: Mapped[dict[str, Any] | None]
    #: Set by an admin's cancel of a running run; the trainer stops the run when it sees it.
    cancel_requested_at: Mapped[datetime | None]
    # Deliveries of the task: more than one means a trainer died and the run was restarted.
    attempts: Mapped[int] = mapped_column(SmallInteger, default=0)
    # Set when the task was handed to the broker; a queued run without it is sent again.
    dispatched_at: Mapped[datetime | None]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class TokenRole(StrEnum):
    """What an API token may do: ``submit`` its own jobs, or everything (``admin``)."""

    SUBMIT = "submit"
    ADMIN = "admin"


class ApiToken(Base):
    """A bearer token of the REST API; the token itself is never stored, only its SHA-256.

    ``id`` is what jobs record as their owner and what ``face-emotions tokens revoke`` takes;
    ``prefix`` (the token's first characters) lets a person match a listed row to the token
    they hold without the table being able to authenticate anyone. Revocation sets
    ``revoked_at`` instead of deleting, so jobs keep a meaningful owner.
    """

    __tablename__ = "api_tokens"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    name: Mapped[str] = mapped_column(String(100), default="")
    role: Mapped[str] = mapped_column(String(16))
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Updated at most once a minute (see tokens.TOUCH_INTERVAL), not on every request.
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]
