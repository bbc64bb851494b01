"""One redaction of secrets for every service's logs and every message shown to a user.

Secrets leak through logs in a few predictable shapes: a URL with a password in it (database,
broker, S3 endpoint) inside an exception message, a bearer header, an API token, a
``token=``/``password=`` parameter in a query string (gunicorn's access log). The API, the
workers, the trainer and the CLI all filter their records (and the error texts they store or
print) through :data:`redactor`, so a rule added here holds everywhere.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import traceback
from collections.abc import Iterable
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from face_emotions.settings import Settings

REDACTED = "***"

_BEARER = re.compile(r"(?i)(bearer\s+)[^\s'\",]+")
_API_TOKEN = re.compile(r"fe_[A-Za-z0-9_-]{16,}")
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
#: ``name=value`` where the name says secret: query strings (``?token=...`` in an access log,
#: S3's ``X-Amz-Signature``), DSNs (``password=...``), form bodies quoted in errors.
_SECRET_PARAMETER = re.compile(
    r"(?i)(?P<name>\b[\w.-]*?(?:token|password|passwd|pwd|secret|api[_-]?key|apikey|signature"
    r"|credential|sessionid|session_id)=)[^&\s\"',;#]+"
)
#: Environment variables whose values are secrets wherever they are set (S3, MLflow).
SECRET_ENVIRONMENT = (
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    "EMOTIONS_ADMIN_TOKEN",
)


class SecretRedactor(logging.Filter):
    """Rewrites log records so that known secrets and token-shaped strings never reach a
    handler: bearer values, ``fe_`` API tokens, passwords in URLs and the configured secrets
    (admin token, database and broker passwords). Tracebacks are formatted and redacted too,
    since exception messages are where a URL with a password usually hides."""

    def __init__(self) -> None:
        super().__init__()
        self._secrets: set[str] = set()
        self._lock = threading.Lock()

    def add_secret(self, secret: str | None) -> None:
        if secret and len(secret) >= 4:
            with self._lock:
                self._secrets.add(secret)

    def redact(self, text: str) -> str:
        with self._lock:
            secrets = sorted(self._secrets, key=len, reverse=True)
        for secret in secrets:
            text = text.replace(secret, REDACTED)
        text = _BEARER.sub(lambda m: m.group(1) + REDACTED, text)
        text = _API_TOKEN.sub(REDACTED, text)
        text = _SECRET_PARAMETER.sub(lambda m: m["name"] + REDACTED, text)
        return redact_url(text)

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a broken format string: leave it to the handler to report
            return True
        record.msg = self.redact(message)
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            formatted = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = self.redact(formatted)
            record.exc_info = None
        return True


redactor = SecretRedactor()


def redact(text: str) -> str:
    """For messages built outside logging (error bodies, stored failure reasons, CLI output)."""
    return redactor.redact(text)


def redact_url(text: str) -> str:
    """URLs fit to print: the user name and password of each replaced, the rest kept."""
    return _URL_USERINFO.sub(lambda m: f"{m['scheme']}{REDACTED}@", text)


def install_log_redaction(settings: Settings, logger_names: Iterable[str] = ()) -> None:
    """Register ``settings``' secrets and attach the redactor to ``logger_names`` and to the
    root logger's handlers (once each).

    Logger filters see records where they are created, before any handler; handler filters see
    every record that propagates to the root, whichever module logged it.
    """
    redactor.add_secret(settings.admin_token)
    for name in SECRET_ENVIRONMENT:
        redactor.add_secret(os.environ.get(name))
    for url in (settings.resolved_database_url, settings.broker_url):
        redactor.add_secret(_url_password(url))
    for name in logger_names:
        logger = logging.getLogger(name)
        if redactor not in logger.filters:
            logger.addFilter(redactor)
    for handler in logging.getLogger().handlers:
        if redactor not in handler.filters:
            handler.addFilter(redactor)


def _url_password(url: str) -> str | None:
    try:
        return urlsplit(url).password
    except ValueError:
        return None
