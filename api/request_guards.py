"""Hostile request shapes refused with the API's JSON 4xx before a view can turn them into a 500.

- Route integers beyond a 64-bit column (``/images/18446744073709551616/...``) do not match the
  route at all, so they are the same 404 as any unknown id, never a database overflow.
- A chunked body (no ``Content-Length``) is read up to the small-body limit here: Werkzeug
  cannot refuse it by its declared size, and a body cut at the limit would parse as garbage
  (a 400) instead of the 413 it is.
- JSON nested deeper than Python's recursion limit is a 400, not a ``RecursionError``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from collections.abc import Iterable
from typing import Any

from flask import Flask
from flask import request
from werkzeug.routing import IntegerConverter

from api.errors import ApiError
from api.security import SMALL_BODY_BYTES

#: The largest id a BIGINT column holds; the largest model version is smaller still.
MAX_ROUTE_INT = 2**63 - 1
#: Set by :class:`ChunkedBodyLimit` on a chunked body over :data:`SMALL_BODY_BYTES`.
TOO_LARGE_KEY = "face_emotions.body_too_large"
JSON_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class BoundedIntConverter(IntegerConverter):
    """``<int:...>`` in every route, capped at :data:`MAX_ROUTE_INT`."""

    def __init__(self, url_map: Any, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("max", MAX_ROUTE_INT)
        super().__init__(url_map, *args, **kwargs)


class ChunkedBodyLimit:
    """WSGI middleware: a chunked non-multipart body is buffered up to the small-body limit and
    handed on with its real length; one over it is dropped and flagged for a 413. Multipart
    uploads stream on (Werkzeug counts them against ``MAX_CONTENT_LENGTH`` as they arrive)."""

    def __init__(self, app: Callable[..., Iterable[bytes]], limit: int = SMALL_BODY_BYTES) -> None:
        self.app = app
        self.limit = limit

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        multipart = environ.get("CONTENT_TYPE", "").startswith("multipart/")
        if chunked and not multipart and not environ.get("CONTENT_LENGTH"):
            body = environ["wsgi.input"].read(self.limit + 1)
            if len(body) > self.limit:
                environ[TOO_LARGE_KEY] = True
                body = b""
            environ["wsgi.input"] = io.BytesIO(body)
            environ["CONTENT_LENGTH"] = str(len(body))
            environ.pop("wsgi.input_terminated", None)
        return self.app(environ, start_response)


def refuse_hostile_bodies() -> None:
    if request.environ.get(TOO_LARGE_KEY):
        raise ApiError(
            413,
            "payload_too_large",
            f"the request body is over {SMALL_BODY_BYTES // 1024} KiB "
            "(files go in a multipart upload)",
        )
    if request.method in JSON_METHODS and request.is_json:
        try:
            request.get_json(silent=True)  # parsed once here, cached for the view
        except RecursionError:
            raise ApiError(400, "invalid_json", "the JSON body is nested too deeply") from None


def init_app(app: Flask) -> None:
    """Before any blueprint is registered: routes bind their converters when added."""
    app.url_map.converters["int"] = BoundedIntConverter
    app.wsgi_app = ChunkedBodyLimit(app.wsgi_app)  # type: ignore[method-assign]
    app.before_request(refuse_hostile_bodies)
