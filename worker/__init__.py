"""Celery worker service: runs inference chunks from queue ``inference``."""
