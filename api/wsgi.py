"""Gunicorn entry point: ``gunicorn 'api.wsgi:app'`` (settings from ``EMOTIONS_*``).

Logging is configured here, for the process, before the app is built: ``EMOTIONS_LOG_FORMAT``
and ``EMOTIONS_LOG_LEVEL`` (gunicorn's own error and access logs follow the format too).
"""

from __future__ import annotations

from api.app import create_app
from face_emotions.ops.log_format import configure_logging
from face_emotions.ops.log_format import format_handlers_of
from face_emotions.settings import get_settings

configure_logging(get_settings())
format_handlers_of(("gunicorn.error", "gunicorn.access"), get_settings())
app = create_app()
