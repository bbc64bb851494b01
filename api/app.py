"""The Flask application factory: one app per call, configured only from :class:`Settings`.

``broker`` and ``registry_factory`` are injectable so tests (and embedded setups) run
the API without a broker or an MLflow server; production passes nothing and gets Celery and
the MLflow registry from the same ``EMOTIONS_*`` settings the workers read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any
from typing import cast

from apiflask import APIFlask
from flask.json.provider import DefaultJSONProvider

from api import auth
from api import console
from api import docs_assets
from api import errors
from api import extensions
from api import health
from api import jobs
from api import limits
from api import metrics_route
from api import models
from api import openapi_docs
from api import request_guards
from api import security
from api import thumbnails
from api import training_runs
from api.schemas.common import ErrorOut
from face_emotions import __version__
from face_emotions.jobs.broker import BrokerClient
from face_emotions.jobs.broker import ChunkSender
from face_emotions.ops.redaction import install_log_redaction
from face_emotions.settings import Settings
from face_emotions.settings import get_settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024


def create_app(
    settings: Settings | None = None,
    *,
    broker: ChunkSender | None = None,
    registry_factory: Callable[[], Any] | None = None,
) -> APIFlask:
    """Build the API: config, migrations, error handlers, services, security, blueprints."""
    settings = settings or get_settings()
    # Before anything below can log a secret.
    install_log_redaction(settings, security.REDACTED_LOGGERS)
    auth.warn_if_disabled(settings)
    app = APIFlask(
        __name__,
        title="face-emotions",
        version=__version__,
        spec_path="/openapi.json",
        docs_path="/docs",
    )
    app.config.update(
        # The limit is enforced by Werkzeug while reading the body: an oversized upload is
        # refused with 413 before it fills the disk.
        MAX_CONTENT_LENGTH=settings.max_upload_mb * MIB,
        # Werkzeug's default of 1000 multipart parts would cap uploads below the job limit.
        MAX_FORM_PARTS=settings.max_images_per_job + 16,
        VALIDATION_ERROR_STATUS_CODE=400,
        VALIDATION_ERROR_DESCRIPTION="Invalid input",
        VALIDATION_ERROR_SCHEMA=ErrorOut,
        HTTP_ERROR_SCHEMA=ErrorOut,
    )
    # Keep the documented field order (seed record shape). Flask types ``app.json`` as the
    # base JSONProvider; the app's is its DefaultJSONProvider, which has ``sort_keys``.
    cast(DefaultJSONProvider, app.json).sort_keys = False
    # APIFlask types the processor's argument ``dict | str``, but it is always the dict of
    # ``APISpec.to_dict()`` (SPEC_PROCESSOR_PASS_OBJECT is off; YAML is made after it).
    app.spec_processor(lambda spec: openapi_docs.process_spec(app, cast(dict[str, Any], spec)))

    if settings.migrate_on_start:
        from face_emotions.jobs.migrate import upgrade

        upgrade(settings.resolved_database_url)

    if broker is None:
        broker = BrokerClient.from_settings(settings)
    if registry_factory is None:
        registry_factory = _default_registry_factory(settings)

    errors.init_app(app)
    docs_assets.init_app(app)  # before security: the docs policy follows where UI files live
    security.init_app(app, settings)
    request_guards.init_app(app)  # after security's body cap, before any route is added
    extensions.init_app(app, settings, broker=broker, registry_factory=registry_factory)
    metrics_route.init_app(app, settings)
    limits.init_app(app, settings, key=_rate_limit_key)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(thumbnails.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(training_runs.bp)
    app.register_blueprint(console.bp)
    return app


def _rate_limit_key() -> str:
    """Rate-limit bucket of the request: its principal (never empty, so never skipped).

    The submission view authenticates before it counts, so the anonymous bucket is only a
    fallback; with auth disabled everyone shares the ``principal:`` bucket.
    """
    principal = auth.optional_principal()
    return f"principal:{principal.id}" if principal is not None else "anonymous"


def _default_registry_factory(settings: Settings) -> Callable[[], Any]:
    def factory() -> Any:
        # Imported here: MLflow is heavy, and the API must start while the registry is down.
        from face_emotions.registry.mlflow_registry import Registry

        return Registry(settings)

    return factory
