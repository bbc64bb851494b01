"""The Flask application factory: one app per call, configured only from :class:`Settings`.

``broker`` and ``registry_factory`` are injectable so tests (and embedded setups) run
the API without a broker or an MLflow server; production passes nothing and gets Celery and
the MLflow registry from the same ``EMOTIONS_*`` settings the workers read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from typing import Any

from apiflask import APIFlask

from api import (
    auth,
    console,
    docs_assets,
    errors,
    extensions,
    health,
    jobs,
    limits,
    metrics_route,
    models,
    security,
    thumbnails,
    training_runs,
)
from api.schemas import ErrorOut
from face_emotions import __version__
from face_emotions.jobs.broker import BrokerClient, ChunkSender
from face_emotions.ops.redaction import install_log_redaction
from face_emotions.settings import Settings, get_settings

log = logging.getLogger(__name__)

MIB = 1024 * 1024
#: ``<converter(args):name>`` in a Werkzeug rule.
_VARIABLE = re.compile(r"<(?:(?P<converter>[A-Za-z_]\w*)(?:\([^)]*\))?:)?(?P<name>\w+)>")
#: What the converters our routes use accept (``int`` is unsigned unless told otherwise).
CONVERTER_SCHEMAS: dict[str, dict[str, Any]] = {
    "uuid": {"type": "string", "format": "uuid"},
    "int": {"type": "integer", "minimum": 0},
}


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
    app.json.sort_keys = False  # keep the documented field order (seed record shape)
    app.spec_processor(lambda spec: _process_spec(app, spec))

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


def _process_spec(app: APIFlask, spec: dict[str, Any]) -> dict[str, Any]:
    """What APIFlask cannot infer: security on every /api/ route, the two request bodies of
    job submission, and what the URL converters accept."""
    spec = auth.document_security(spec)
    spec = jobs.document_request_bodies(spec)
    return _document_path_converters(app, spec)


def _document_path_converters(app: APIFlask, spec: dict[str, Any]) -> dict[str, Any]:
    """Say in the spec what the URL converters accept (``uuid`` ids, non-negative integers).

    APIFlask documents every path parameter as a plain string or integer; clients and
    fuzzers that read the spec then build URLs that cannot match any route.
    """
    formats: dict[tuple[str, str], dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        path = _VARIABLE.sub(lambda m: "{" + m["name"] + "}", rule.rule)
        for match in _VARIABLE.finditer(rule.rule):
            schema = CONVERTER_SCHEMAS.get(match["converter"] or "")
            if schema is not None:
                formats[(path, match["name"])] = schema
    for path, operations in spec.get("paths", {}).items():
        for operation in operations.values():
            if not isinstance(operation, dict):
                continue
            for parameter in operation.get("parameters", []):
                schema = formats.get((path, parameter.get("name", "")))
                if parameter.get("in") == "path" and schema is not None:
                    parameter["schema"] = dict(schema)
    return spec


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
