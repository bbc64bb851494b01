"""gunicorn's side of the API: the worker class and logger that :mod:`api.gunicorn_conf` names.

Some requests never reach Flask: a request line over gunicorn's limit, too many or too large
headers, a malformed request. gunicorn answers those itself with an HTML page and none of the
API's security headers; :class:`ApiWorker` answers them in the API's one JSON error shape
(``{"error": {"code", "message"}}``) with the right status (414, 431, 400...). Its access
and error logs go through the secret redactor like every other log (:class:`RedactingLogger`).
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

from gunicorn import util
from gunicorn.glogging import Logger
from gunicorn.http import errors as http_errors
from gunicorn.http.wsgi import Response
from gunicorn.http.wsgi import default_environ
from gunicorn.workers.ggevent import GeventWorker

from api.security import BASE_HEADERS
from api.security import JSON_CSP
from face_emotions.ops.redaction import redact
from face_emotions.ops.redaction import redactor

#: gunicorn's parser errors, by the status and code the API answers them with. Anything else
#: that reaches :meth:`ApiWorker.handle_error` is our fault: 500.
PARSER_ERRORS: tuple[tuple[type[BaseException], int, str, str], ...] = (
    (http_errors.LimitRequestLine, 414, "URI Too Long", "uri_too_long"),
    (
        http_errors.LimitRequestHeaders,
        431,
        "Request Header Fields Too Large",
        "request_header_fields_too_large",
    ),
    (http_errors.UnsupportedTransferCoding, 501, "Not Implemented", "not_implemented"),
    (http_errors.ExpectationFailed, 417, "Expectation Failed", "expectation_failed"),
    (http_errors.ForbiddenProxyRequest, 403, "Forbidden", "forbidden"),
    (http_errors.ParseException, 400, "Bad Request", "bad_request"),
)
#: The headers every API response carries, as ``api.security`` adds them to Flask's.
SECURITY_HEADERS = {
    **BASE_HEADERS,
    "Content-Security-Policy": JSON_CSP,
    "Cache-Control": "no-store",
}


def classify(exc: BaseException) -> tuple[int, str, str, str]:
    """(status, reason, code, message) for an error gunicorn raised before the app ran."""
    for kind, status, reason, code in PARSER_ERRORS:
        if isinstance(exc, kind):
            message = {
                414: "the request line is too long (at most 8190 bytes)",
                431: "too many or too large request headers (at most 100 of 8190 bytes)",
            }.get(status) or redact(f"{reason.lower()}: {exc}")
            return status, reason, code, message
    return 500, "Internal Server Error", "internal_error", "internal server error; see the log"


def error_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 response closing the connection, as the API's errors look."""
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "Connection: close"]
    head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
    head += [f"{name}: {value}" for name, value in SECURITY_HEADERS.items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class ApiWorker(GeventWorker):
    """gunicorn's gevent worker, answering the requests gunicorn refuses in JSON, with fsspec's
    S3 calls made cooperative (see :mod:`api.gevent_fsspec`)."""

    def patch(self) -> None:
        from api import gevent_fsspec

        gevent_fsspec.start_io_thread()  # a real thread: before gevent patches `threading`
        super().patch()
        gevent_fsspec.install()

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        started = datetime.now()
        addr = addr or ("", -1)  # a unix socket has no peer address
        status, reason, code, message = classify(exc)
        if status == 500:
            self.log.exception("Error handling request %s", getattr(req, "uri", "(no URI read)"))
        else:
            self.log.warning("Invalid request from ip=%s: %s", addr[0], exc)
        if req is None and isinstance(
            exc, http_errors.InvalidHeader | http_errors.InvalidHeaderName
        ):
            req = getattr(exc, "req", None)
        if req is not None:
            environ = default_environ(req, client, self.cfg)
            environ["REMOTE_ADDR"] = addr[0]
            environ["REMOTE_PORT"] = str(addr[1])
            response = Response(req, client, self.cfg)
            response.status = f"{status} {reason}"
            response.response_length = 0
            self.log.access(response, req, environ, datetime.now() - started)
        try:
            util.write_nonblock(client, error_response(status, reason, code, message))
        except Exception:
            self.log.debug("Failed to send error message.")


class RedactingLogger(Logger):
    """gunicorn's logger with the secret redactor on its error and access logs: a token in a
    query string (``?token=...``) or a password in a URL never reaches a log line."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        for log in (self.error_log, self.access_log):
            if redactor not in log.filters:
                log.addFilter(redactor)
