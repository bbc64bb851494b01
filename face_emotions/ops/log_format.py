"""Log format of every service: ``EMOTIONS_LOG_FORMAT=text`` (default) or ``json``, at
``EMOTIONS_LOG_LEVEL``.

JSON lines carry ``timestamp`` (UTC, ISO 8601), ``level``, ``logger`` and ``message``, plus any
extra fields of the record, such as ``job_id``, ``model_version`` and ``worker``::

    log.info("job submitted", extra=job_context(job.id, model_version=3))
    job_log = JobLogger(log, job_id=job.id)
    job_log.info("chunk done")        # carries job_id

:func:`configure_logging` gives the root logger one handler of ours (replaced, never
duplicated, when called again) and leaves other handlers alone. Celery workers keep the handler
Celery installs; :func:`apply_format` gives it the JSON formatter (see worker.app).
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import MutableMapping
from typing import Any

from pythonjsonlogger.json import JsonFormatter

from face_emotions.settings import Settings

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _OurHandler(logging.StreamHandler):
    """Marks the handler this module installed, so reconfiguring replaces it."""


def json_formatter() -> logging.Formatter:
    return JsonFormatter(
        "%(levelname)s %(name)s %(message)s",
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
    )


def text_formatter() -> logging.Formatter:
    return logging.Formatter(TEXT_FORMAT)


def formatter_for(log_format: str) -> logging.Formatter:
    return json_formatter() if log_format == "json" else text_formatter()


def configure_logging(settings: Settings, *, level: str | int | None = None) -> None:
    """Point the root logger at stderr in the configured format and level.

    ``level`` overrides ``EMOTIONS_LOG_LEVEL`` unless that was set explicitly (a Celery
    ``--loglevel`` is passed here, and an explicit setting wins over it).
    """
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(handler)
    handler = _OurHandler(sys.stderr)
    handler.setFormatter(formatter_for(settings.log_format))
    root.addHandler(handler)
    root.setLevel(resolve_level(settings, level))


def apply_format(
    logger: logging.Logger, settings: Settings, *, level: str | int | None = None
) -> None:
    """Give the handlers another library installed on ``logger`` the configured format (in
    JSON mode; in text mode they keep their own layout) and set its level."""
    if settings.log_format == "json":
        for handler in logger.handlers:
            handler.setFormatter(json_formatter())
    logger.setLevel(resolve_level(settings, level))


def format_handlers_of(names: Iterable[str], settings: Settings) -> None:
    """JSON mode: the handlers of these loggers (gunicorn's error and access logs, which do
    not propagate to the root) write JSON too; their levels are left alone."""
    if settings.log_format != "json":
        return
    for name in names:
        for handler in logging.getLogger(name).handlers:
            handler.setFormatter(json_formatter())


def resolve_level(settings: Settings, level: str | int | None = None) -> int:
    """``EMOTIONS_LOG_LEVEL`` if it was set (or no other level is given), else ``level``."""
    if level is None or "log_level" in settings.model_fields_set:
        return logging.getLevelName(settings.log_level)
    if isinstance(level, str):
        return logging.getLevelName(level.upper())
    return level


def job_context(
    job_id: uuid.UUID | str | None = None,
    *,
    model_version: int | None = None,
    worker: str | None = None,
) -> dict[str, Any]:
    """``extra=`` fields of a log record about a job; ``None`` values are left out."""
    context = {"job_id": job_id, "model_version": model_version, "worker": worker}
    return {
        key: str(value) if key == "job_id" else value
        for key, value in context.items()
        if value is not None
    }


class JobLogger(logging.LoggerAdapter):
    """A logger whose records carry a job's context; per-call ``extra`` is merged in."""

    def __init__(
        self,
        logger: logging.Logger,
        job_id: uuid.UUID | str | None = None,
        *,
        model_version: int | None = None,
        worker: str | None = None,
    ) -> None:
        super().__init__(logger, job_context(job_id, model_version=model_version, worker=worker))

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra: Mapping[str, Any] = kwargs.get("extra") or {}
        kwargs["extra"] = {**(self.extra or {}), **extra}
        return msg, kwargs
