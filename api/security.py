"""Response hardening and secret hygiene: security headers on every response, no CORS, and
the API's loggers that the log redactor (:mod:`face_emotions.ops.redaction`) watches.

Headers: the API serves JSON (and CSV/JSONL exports) that no browser should sniff into HTML,
frame or cache, so every response says ``nosniff``, ``DENY``, ``no-referrer``, ``/api/``
responses say ``no-store`` (results are private to a token), and everything but the docs page
gets ``Content-Security-Policy: default-src 'none'``: even if an attacker got markup into a
response, a browser would run nothing from it. The ``/docs`` page loads Swagger UI (from this
origin, :mod:`api.docs_assets`) with an inline bootstrap script, so it gets a policy that
allows exactly that. The web console
(:mod:`api.console`) and its static files get :data:`CONSOLE_CSP`: scripts, styles and API
calls from this origin only (no inline code at all), images from this origin and ``blob:``.

CORS is off: no ``Access-Control-Allow-*`` header is ever sent, so browsers on other origins
cannot read responses. Clients are scripts and the CLI, which CORS does not concern.

Body size: ``EMOTIONS_MAX_UPLOAD_MB`` is for multipart uploads. Every other body (JSON job and
training-run requests) is capped at :data:`SMALL_BODY_BYTES`, because JSON is parsed into memory
whole: a 500 MiB JSON document would cost gigabytes of Python objects for a request whose
honest size is a few hundred bytes.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from flask import Flask
from flask import Response
from flask import request

from face_emotions.ops.redaction import install_log_redaction
from face_emotions.settings import Settings

#: Largest non-multipart request body (413 above it).
SMALL_BODY_BYTES = 1024 * 1024
JSON_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
DOCS_PATHS = ("/docs",)
#: The web console's pages and static files: its own scripts and styles, its API calls, and
#: thumbnails fetched with the token and shown as ``blob:`` URLs. Still no inline script.
CONSOLE_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
#: Endpoints served under :data:`CONSOLE_CSP` (blueprint ``console.*`` and Flask's static).
CONSOLE_BLUEPRINT = "console"
BASE_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}
#: Logger names whose records are redacted (records are filtered where they are created, so
#: every module logger that may see a secret is listed, not only the package's root).
REDACTED_LOGGERS = (
    "api",
    "api.app",
    "api.auth",
    "api.console",
    "api.errors",
    "api.extensions",
    "api.health",
    "api.jobs",
    "api.limits",
    "api.metrics_route",
    "api.models",
    "api.thumbnails",
    "api.training_runs",
    "flask_limiter",
    "api.cluster_metrics",
    # The core's submission logs broker errors, which may quote the broker URL.
    "face_emotions.jobs.submission",
    "werkzeug",
)


def docs_csp(app: Flask) -> str:
    """The policy of the Swagger UI page: its scripts and styles (and their origin, were they
    moved to a CDN again), its inline bootstrap,
    its favicon, the spec from this origin, nothing else, and never inside a frame."""
    code = _origins(
        app, ("SWAGGER_UI_CSS", "SWAGGER_UI_BUNDLE_JS", "SWAGGER_UI_STANDALONE_PRESET_JS")
    )
    images = _origins(app, ("DOCS_FAVICON",)) | code
    code_sources = " ".join(sorted(code))
    image_sources = " ".join(sorted(images))
    return (
        f"default-src 'none'; script-src 'self' 'unsafe-inline' {code_sources}; "
        f"style-src 'self' 'unsafe-inline' {code_sources}; img-src 'self' data: {image_sources}; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )


def _origins(app: Flask, keys: tuple[str, ...]) -> set[str]:
    origins: set[str] = set()
    for key in keys:
        parts = urlsplit(app.config.get(key) or "")
        if parts.scheme in {"http", "https"} and parts.netloc:
            origins.add(f"{parts.scheme}://{parts.netloc}")
    return origins


def init_app(app: Flask, settings: Settings) -> None:
    """Install the header hook and register this app's secrets with the log redactor."""
    docs_policy = docs_csp(app)

    def add_security_headers(response: Response) -> Response:
        for name, value in BASE_HEADERS.items():
            response.headers.setdefault(name, value)
        path = request.path
        is_docs = any(path == p or path.startswith(p + "/") for p in DOCS_PATHS)
        if is_docs:
            policy = docs_policy
        elif is_console_request():
            policy = CONSOLE_CSP
        else:
            policy = JSON_CSP
        response.headers["Content-Security-Policy"] = policy
        if path.startswith("/api/"):
            response.headers["Cache-Control"] = "no-store"
        # CORS is off by default: make sure nothing upstream added it either.
        # Iterating Headers yields (name, value) pairs: delete by name.
        for name in [k for k, _ in response.headers if k.lower().startswith("access-control-")]:
            del response.headers[name]
        return response

    def cap_small_bodies() -> None:
        if request.mimetype != "multipart/form-data":
            limit = app.config.get("MAX_CONTENT_LENGTH")
            request.max_content_length = min(limit or SMALL_BODY_BYTES, SMALL_BODY_BYTES)

    app.before_request(cap_small_bodies)
    app.after_request(add_security_headers)
    install_log_redaction(settings, REDACTED_LOGGERS)


def is_console_request() -> bool:
    """Whether the request was routed to a console page or a static file (not the API)."""
    endpoint = request.endpoint or ""
    return endpoint == "static" or endpoint.startswith(CONSOLE_BLUEPRINT + ".")
