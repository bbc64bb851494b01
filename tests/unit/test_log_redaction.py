"""One redaction for every service's logs (issue 14, item 8): whatever a service logs, through
whichever logger, tokens, passwords and the configured secrets come out as ``***``."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator

import pytest

from face_emotions.ops.redaction import redact
from face_emotions.ops.redaction import redactor

LINES = (
    "GET /api/v1/jobs?token=fe_querytoken1234567890&page=2 HTTP/1.1",
    "GET /healthz?password=hunter2hunter2&access_token=abc.def.ghi HTTP/1.1",
    "host=db.internal user=emotions password=pg-secret-9 dbname=emotions",
    "GET /bucket/x.png?X-Amz-Credential=AKIAXX%2F2026&X-Amz-Signature=5f3a9c",
)
SECRETS = ("fe_querytoken", "hunter2", "abc.def.ghi", "pg-secret-9", "AKIAXX", "5f3a9c")


@pytest.mark.parametrize("line", LINES)
def test_secret_parameters_are_redacted(line: str) -> None:
    redacted = redact(line)
    assert not any(secret in redacted for secret in SECRETS), redacted
    assert "***" in redacted


def test_names_that_only_look_like_secrets_are_kept() -> None:
    for text in ("token_id=5", "max_tokens=3", "tokens=12 processed", "keyboard=us"):
        assert redact(text) == text


@pytest.fixture
def root_handler() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    root = logging.getLogger()
    root.addHandler(handler)
    previous = root.level
    root.setLevel(logging.INFO)
    yield stream
    root.removeHandler(handler)
    root.setLevel(previous)
    if redactor in handler.filters:
        handler.removeFilter(redactor)


@pytest.mark.parametrize(
    ("service", "loggers"),
    [
        ("worker.app", ("celery.app.trace", "worker.tasks", "face_emotions.serving.x")),
        ("training.service", ("celery.worker", "training.run", "face_emotions.jobs.x")),
    ],
)
def test_every_service_redacts_every_logger_and_the_environments_secrets(
    service: str,
    loggers: tuple[str, ...],
    root_handler: io.StringIO,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws-secret-key-value-123")
    module = importlib.import_module(service)
    module._log_format(logger=logging.getLogger(), loglevel=logging.INFO)
    for name in loggers:
        logging.getLogger(name).warning("fetch %s with %s", LINES[0], "aws-secret-key-value-123")
    written = root_handler.getvalue()
    assert written.count("fetch") == len(loggers)
    assert "fe_querytoken" not in written and "aws-secret-key-value-123" not in written
