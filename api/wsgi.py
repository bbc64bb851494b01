"""Gunicorn entry point: ``gunicorn 'api.wsgi:app'`` (settings from ``EMOTIONS_*``)."""

from __future__ import annotations

from api.app import create_app

app = create_app()
