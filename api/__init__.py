"""REST API of face-emotions: batch jobs, their results, the registered models, health."""

from api.app import create_app

__all__ = ["create_app"]
