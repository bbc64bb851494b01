"""One error shape for every failure: ``{"error": {"code": "...", "message": "..."}}``.

Clients branch on ``code`` (stable, snake_case) and show ``message`` (human, may change). The
shape is the same for our own refusals, Werkzeug's HTTP errors (unknown route, 405, 413),
APIFlask's validation errors and unhandled exceptions, so a client needs one error parser.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from apiflask import APIFlask
from apiflask import HTTPError
from apiflask.types import ResponseHeaderType
from flask import Response
from flask import jsonify
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

#: Codes for errors raised by Werkzeug/Flask rather than by our views.
STATUS_CODES: dict[int, str] = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    413: "payload_too_large",
    414: "uri_too_long",
    415: "unsupported_media_type",
    422: "validation_error",
    429: "too_many_requests",
    431: "request_header_fields_too_large",
    500: "internal_error",
    503: "unavailable",
}


class ApiError(HTTPError):
    """An error our views raise on purpose, with a machine-readable ``code``."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(
            status_code, message, headers=dict(headers or {}), extra_data={"code": code}
        )
        self.code = code


def error_body(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def validation_message(detail: Any) -> str:
    """Flatten APIFlask's ``{location: {field: [messages]}}`` into "field: message; ..."."""
    parts: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), inner)
        elif isinstance(value, list | tuple):
            for inner in value:
                walk(prefix, inner)
        else:
            parts.append(f"{prefix}: {value}" if prefix else str(value))

    if isinstance(detail, Mapping):
        for location_errors in detail.values():  # drop the location level (json, query...)
            walk("", location_errors)
    else:
        walk("", detail)
    return "; ".join(parts) or "invalid request"


def _on_http_error(error: HTTPError) -> tuple[dict[str, Any], int, ResponseHeaderType]:
    """APIFlask's error processor: our ApiError, ``abort()`` and validation errors."""
    code = error.extra_data.get("code") if error.extra_data else None
    if code is None and error.detail:
        return (
            error_body("validation_error", validation_message(error.detail)),
            error.status_code,
            error.headers,
        )
    code = code or STATUS_CODES.get(error.status_code, "error")
    message = error.message or "error"
    return error_body(code, message), error.status_code, error.headers


def _on_werkzeug_error(error: HTTPException) -> Response:
    status = error.code or 500
    response = jsonify(
        error_body(STATUS_CODES.get(status, "error"), error.description or error.name)
    )
    response.status_code = status
    for key, value in error.get_headers():
        if key.lower() != "content-type":
            response.headers[key] = value
    return response


def _on_exception(error: Exception) -> Response:
    """Log with the traceback; the client learns only that it was our fault."""
    log.exception("unhandled error: %s", error)
    response = jsonify(error_body("internal_error", "internal server error; see the server log"))
    response.status_code = 500
    return response


def init_app(app: APIFlask) -> None:
    # error_processor re-registers APIFlask's Werkzeug handler, so ours goes after it.
    app.error_processor(_on_http_error)
    app.register_error_handler(HTTPException, _on_werkzeug_error)
    app.register_error_handler(Exception, _on_exception)
