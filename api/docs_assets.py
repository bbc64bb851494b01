"""Swagger UI's scripts and styles for ``/docs``, served by the API itself.

APIFlask points the docs page at a CDN by default; behind a firewall (or offline, as on the
machines this project is tested on) the page would stay blank. The ``swagger-ui-bundle-v2``
package ships the same files, so the page works wherever the API does, and its
Content-Security-Policy needs no third-party origin.
"""

from __future__ import annotations

from flask import Blueprint
from flask import Flask
from flask import Response
from flask import send_from_directory
from swagger_ui_bundle import swagger_ui_path

ASSETS_URL = "/docs/assets"
#: The files the docs page loads, by the APIFlask setting that names each.
ASSETS = {
    "SWAGGER_UI_CSS": "swagger-ui.css",
    "SWAGGER_UI_BUNDLE_JS": "swagger-ui-bundle.js",
    "SWAGGER_UI_STANDALONE_PRESET_JS": "swagger-ui-standalone-preset.js",
}
#: The console's icon (api/static), for the docs tab too.
FAVICON_URL = "/static/favicon.svg"
#: A day: the files change only with the package, and the URL carries no version.
MAX_AGE_SECONDS = 86_400

bp = Blueprint("docs_assets", __name__)


@bp.get(f"{ASSETS_URL}/<path:filename>")
def asset(filename: str) -> Response:
    # send_from_directory refuses paths that leave the directory (404).
    return send_from_directory(str(swagger_ui_path), filename, max_age=MAX_AGE_SECONDS)


def init_app(app: Flask) -> None:
    """Serve the files and point the docs page at them (before its policy is computed)."""
    for setting, filename in ASSETS.items():
        app.config[setting] = f"{ASSETS_URL}/{filename}"
    app.config["DOCS_FAVICON"] = FAVICON_URL  # APIFlask's default is on apiflask.com
    app.register_blueprint(bp)
