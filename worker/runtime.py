"""Per-process state of a pool process: DB sessions, the model holder and the image loader,
created lazily (in the pool process, after the fork: s3fs clients must not cross a fork)."""

from __future__ import annotations

import logging
import threading
from functools import lru_cache

from sqlalchemy.orm import Session, sessionmaker

from human_face_emotions.chunk_classifier import ImageLoader, storage_image_loader
from human_face_emotions.db.engine import create_db_engine, session_factory
from human_face_emotions.model_holder import ModelHolder
from human_face_emotions.settings import Settings, get_settings

log = logging.getLogger(__name__)


def configure_torch_threads(settings: Settings) -> None:
    import torch

    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)


@lru_cache(maxsize=1)
def sessions() -> sessionmaker[Session]:
    return session_factory(create_db_engine(get_settings().resolved_database_url))


@lru_cache(maxsize=1)
def image_loader() -> ImageLoader:
    """Reads local paths and ``s3://`` URLs (EMOTIONS_S3_ENDPOINT_URL).

    Cached so a pool process keeps one S3 client (connection pool) for all its tasks.
    """
    return storage_image_loader(get_settings())


@lru_cache(maxsize=1)
def holder() -> ModelHolder:
    from worker.app import RELOAD_GENERATION

    settings = get_settings()
    model_holder = ModelHolder(settings, reload_generation=lambda: RELOAD_GENERATION.value)
    _start_idle_refresher(model_holder, settings.model_refresh_seconds)
    return model_holder


def _start_idle_refresher(model_holder: ModelHolder, interval: float) -> None:
    """Pre-load a newly promoted version while the worker is idle, so the swap is instant."""
    if interval <= 0:
        return

    def loop() -> None:
        stop = threading.Event()
        while not stop.wait(interval):
            try:
                model_holder.poll()
            except Exception as exc:
                log.debug("idle model refresh failed: %s", exc)

    threading.Thread(target=loop, name="model-refresher", daemon=True).start()
