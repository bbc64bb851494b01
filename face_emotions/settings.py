"""Runtime configuration: every service reads ``EMOTIONS_*`` environment variables (12-factor).

Defaults give the embedded one-machine setup (SQLite, local MLflow store under ``var/``); compose
overrides them with service URLs. Training's hyper-parameters live in Hydra configs instead.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated
from typing import Literal

from pydantic import Field
from pydantic import field_validator
from pydantic_settings import BaseSettings
from pydantic_settings import SettingsConfigDict

from face_emotions.data.storage import is_remote
from face_emotions.data.storage import local_path
from face_emotions.data.storage import normalise_url
from face_emotions.data.storage import parse_location

#: What ``EMOTIONS_DEVICE`` may say (face_emotions.serving.device_assignment reads it).
DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]+)?)$"


def default_var_dir() -> Path:
    """Where the embedded defaults live when ``EMOTIONS_VAR_DIR`` is not set.

    Never the current directory: ``face-emotions models`` run from another folder must find
    the same registry and database as ``make demo``, not silently start an empty store. In a
    source checkout (``make setup``'s editable install) that is the checkout's ``var/``;
    installed as a package, the user's data folder (``$XDG_DATA_HOME/face-emotions``).
    """
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "face_emotions").is_dir():
        return checkout / "var"
    data_home = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home) / "face-emotions"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EMOTIONS_", env_file=None, extra="ignore")

    var_dir: Path = Field(
        default_factory=default_var_dir,
        description="Working directory for the embedded defaults (SQLite, MLflow store, logs); "
        "default: the checkout's var/ (or ~/.local/share/face-emotions when installed).",
    )
    mlflow_tracking_uri: str | None = Field(
        default=None,
        description="MLflow tracking URI; falls back to MLFLOW_TRACKING_URI, then a sqlite "
        "store under var/mlflow.",
    )
    model_name: str = Field(default="face-emotion", description="Registered MLflow model name.")
    model_alias: str = Field(default="champion", description="Alias workers serve.")
    model_cache_dir: Path | None = Field(
        default=None, description="Where downloaded model versions are kept (var/model-cache)."
    )
    device: str = Field(
        default="auto",
        pattern=DEVICE_PATTERN,
        description="Inference device: auto uses CUDA when present, else the CPU; cuda requires "
        "it; with either, a worker's pool processes take the visible GPUs round-robin (process i "
        "on GPU i % n). cuda:N puts every process on GPU N; cpu every one on the CPU.",
    )
    worker_processes: Annotated[int, Field(ge=1, le=256)] | Literal["auto"] = Field(
        default="auto",
        description="Pool processes of an inference worker (Celery's worker_concurrency) when "
        "its command line gives no --concurrency: auto = one per visible CUDA device, each "
        "pinned to its own GPU, when the device is auto or cuda and there is a GPU; 1 on the "
        "CPU or with cuda:N. auto sizes the prefork pool only (--pool threads keeps Celery's "
        "default; its threads share one device).",
    )
    max_image_pixels: int = Field(
        default=40_000_000, gt=0, description="Decompression-bomb guard, pixels per image."
    )
    batch_size: int = Field(
        default=32, gt=0, le=4096, description="Images per forward pass (micro-batch)."
    )
    chunk_batches: int = Field(
        default=4,
        gt=0,
        le=1000,
        description="Micro-batches per queued task: bigger chunks amortise per-task overhead, "
        "smaller ones spread a job over more workers.",
    )
    database_url: str | None = Field(
        default=None, description="SQLAlchemy URL; default a SQLite file var/emotions.db."
    )
    broker_url: str = Field(
        default="redis://localhost:6379/0", description="Celery broker (Redis) URL."
    )
    data_root: str = Field(
        default="data",
        description="Folder jobs may only read below this root: a local directory (or "
        "file:///path), or s3://bucket/prefix for images in an object store.",
    )
    model_refresh_seconds: float = Field(
        default=10.0, ge=0, description="How often workers check the serving alias."
    )
    pinned_model_cache: int = Field(
        default=2, ge=1, le=16, description="Pinned model versions a worker keeps loaded."
    )
    backend: Literal["auto", "onnx", "onnx-int8", "torch", "torch-bf16"] = Field(
        default="auto",
        description="Inference backend: auto measures each backend the version can run here "
        "(fp32 ONNX, its gated INT8 variant, torch, bf16 torch where the CPU has AVX512-BF16 "
        "or AMX) at load and serves the fastest that agrees with fp32; any other value forces "
        "that backend.",
    )
    autotune_batches: int = Field(
        default=3,
        ge=1,
        le=50,
        description="Timing rounds (one micro-batch per backend each) when EMOTIONS_BACKEND=auto "
        "tunes a load.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        default="auto",
        description="Forward-pass precision: auto = bf16/fp16 autocast on CUDA, fp32 on CPU.",
    )
    torch_compile: bool = Field(
        default=False, description="Compile the model with torch.compile (GPU workers)."
    )
    decode_threads: int = Field(
        default=2, ge=1, le=64, description="Image decode (and face detection) threads."
    )
    faces: Literal["all", "largest", "none"] = Field(
        default="all",
        description="Face policy of jobs that name none: classify every face (all), only the "
        "largest, or the whole image without detection (none).",
    )
    #: Face detection (README "Faces"): a face is what MTCNN scores at least ``face_min_score``
    #: and at least ``face_min_size`` pixels wide on a copy of the image at most
    #: ``face_detect_max_side`` long (320: faces from 1/16 of the longer side; a larger copy
    #: finds smaller faces at a squared cost).
    face_min_score: float = Field(default=0.95, gt=0, le=1)
    face_min_size: int = Field(default=20, ge=8, le=1000)
    face_detect_max_side: int = Field(default=320, ge=64, le=8192)
    worker_max_memory_mb: int | None = Field(
        default=None,
        ge=64,
        description="Recycle a worker pool process after a task leaves its resident memory "
        "above this many MiB (Celery's worker_max_memory_per_child): a backstop against leaks. "
        "Default: off.",
    )
    dynamic_batching: bool = Field(
        default=False,
        description="Merge the micro-batches of tasks running at once (start the worker with "
        "--pool threads --concurrency N) into shared forward passes of up to "
        "EMOTIONS_BATCH_SIZE images: many small jobs, few forward passes.",
    )
    max_batch_delay_ms: float = Field(
        default=10.0,
        ge=0,
        le=10_000,
        description="With dynamic batching: longest a micro-batch waits for others to fill a "
        "forward pass before it runs anyway.",
    )
    torch_threads: int | None = Field(
        default=None, ge=1, le=256, description="Intra-op threads (default: all cores)."
    )
    visibility_timeout: int = Field(
        default=3600,
        ge=60,
        description="Seconds before Redis redelivers an unacknowledged task; must exceed the "
        "longest chunk.",
    )
    max_upload_mb: int = Field(default=512, gt=0, description="Largest request body, MiB.")
    max_import_mb: int = Field(
        default=256,
        gt=0,
        description="Largest ONNX file `face-emotions models import` and POST /api/v1/models "
        "accept, MiB.",
    )
    max_images_per_job: int = Field(default=100_000, gt=0, description="Images per job.")
    max_page_size: int = Field(default=1000, gt=0, description="Largest results page.")
    storage_url: str | None = Field(
        default=None,
        description="Where uploads are stored, as a URL: file:///path (default "
        "file://<var>/storage) or s3://bucket/prefix for workers on other hosts.",
    )
    s3_endpoint_url: str | None = Field(
        default=None,
        description="S3-compatible endpoint (MinIO, ...) for s3:// URLs; credentials come from "
        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY.",
    )
    admin_token: str | None = Field(
        default=None,
        description="Bootstrap admin API token (training runs, promotion); keep it secret.",
    )
    training_queue: str = Field(default="training", description="Queue of training runs.")
    api_url: str = Field(
        default="http://127.0.0.1:8000", description="Where clients (and the demo) reach the API."
    )
    auth: Literal["enabled", "disabled"] = Field(
        default="enabled",
        description="API token authentication; disabled only for the local demo (a loud "
        "warning is logged at start-up).",
    )
    submit_rate_limit: str = Field(
        default="120/minute",
        description="Job submissions per token (limits syntax, e.g. 10/second;120/minute).",
    )
    max_queued_images: int = Field(
        default=1_000_000,
        gt=0,
        description="Back-pressure: new jobs get 503 + Retry-After while more images than this "
        "wait in unfinished jobs.",
    )
    stall_seconds: float = Field(
        default=300.0,
        gt=0,
        description="A running job without progress for this long gets its pending chunks "
        "re-enqueued by the recovery sweeper.",
    )
    sweep_seconds: float = Field(
        default=30.0, gt=0, description="How often the recovery sweeper looks for stalled jobs."
    )
    orphan_upload_grace_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="The recovery sweeper removes stored uploads (<storage>/jobs/<id>/) that "
        "belong to no job once nothing in them changed for this long (an API killed "
        "mid-upload leaves them); it looks every min(this, 5 min), at least every sweep.",
    )
    max_chunk_attempts: int = Field(
        default=5,
        ge=1,
        description="Deliveries of a chunk before its remaining images are marked failed.",
    )
    worker_stale_seconds: float = Field(
        default=60.0,
        ge=1,
        description="A worker or trainer that has not reported for this long (killed without a "
        "goodbye, host down) is no longer listed as live; processes report every quarter of "
        "it (15 s apart at most), idle or busy. Give the API and the workers the same value.",
    )
    migrate_on_start: bool = Field(
        default=True, description="The API applies pending migrations when it starts."
    )
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="Log lines as text, or as JSON objects (timestamp, level, logger, message "
        "and job_id, model_version, worker where known) for a log collector.",
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = Field(
        default="INFO",
        description="Least severe log level written; when set, it also overrides a Celery "
        "worker's --loglevel.",
    )
    worker_metrics_port: int = Field(
        default=9808,
        ge=0,
        le=65535,
        description="Port of a worker's Prometheus /metrics (served by its main process for "
        "all its pool processes); 0 disables it.",
    )
    worker_metrics_dir: Path | None = Field(
        default=None,
        description="Directory where a worker's pool processes write their metric samples "
        "(emptied at start, one per worker); default a fresh temporary directory.",
    )
    thumbnail_max_pixels: int = Field(
        default=16_000_000,
        gt=0,
        description="Most pixels the API decodes to make one thumbnail (after a JPEG's reduced "
        "decoding); larger images answer 422 image_too_large instead of costing seconds of CPU.",
    )

    @field_validator("log_level", mode="before")
    @classmethod
    def _level_name(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("var_dir", mode="after")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @field_validator("data_root", "storage_url", mode="before")
    @classmethod
    def _location_text(cls, value: object) -> object:
        """Accept ``Path`` objects (tests, callers) for fields that may also hold URLs."""
        return os.fspath(value) if isinstance(value, os.PathLike) else value

    @field_validator("data_root", "storage_url", mode="after")
    @classmethod
    def _known_scheme(cls, value: str | None) -> str | None:
        """Refuse an unsupported URL at start-up rather than at the first job."""
        if value is not None:
            parse_location(value)
        return value

    @property
    def tracking_uri(self) -> str:
        if self.mlflow_tracking_uri:
            return self.mlflow_tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{self.var_dir / 'mlflow' / 'mlflow.db'}"

    @property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.var_dir / 'emotions.db'}"

    @property
    def resolved_storage_url(self) -> str:
        """Root URL of uploads: ``storage_url`` normalised, else ``file://<var_dir>/storage``."""
        return normalise_url(self.storage_url or self.var_dir / "storage")

    @property
    def data_root_is_remote(self) -> bool:
        return is_remote(self.data_root)

    @property
    def resolved_data_root(self) -> Path:
        """The local data root, resolved; only for local roots (``file://`` or a path)."""
        path = local_path(self.data_root)
        if path is None:
            raise ValueError(f"the data root {self.data_root!r} is not a local directory")
        return Path(path).expanduser().resolve()

    @property
    def artifact_root(self) -> Path:
        """Artefact location for experiments created against the embedded sqlite store."""
        return self.var_dir / "mlflow" / "artifacts"

    @property
    def resolved_model_cache_dir(self) -> Path:
        return (self.model_cache_dir or self.var_dir / "model-cache").expanduser().resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; tests build their own ``Settings(...)`` instead of mutating this."""
    return Settings()
