"""How the API is served, in one place: ``gunicorn --config=python:api.gunicorn_conf api.wsgi:app``.

Compose, ``Dockerfile.gpu`` and ``make demo`` (through ``scripts/launcher.py``) all run this
command, so a limit set here holds in every deployment. Options given on the command line win
over these (``--bind``, ``--workers`` in tests and the demo).

Why gevent workers: a ``sync`` worker is tied to one connection from accept to response, so two
clients that connect and send nothing (or a header line every few seconds) stall the whole API.
A gevent worker holds each connection in a greenlet that costs a few KiB while it waits, so
hundreds of idle or trickling connections leave real requests alone; each request's line and
headers must arrive within :data:`keepalive` seconds (gunicorn's gevent worker reads them under
that deadline) or the connection is closed. Workers are not preloaded: gevent patches the
standard library when a worker starts, and the app must be imported after that (locks and
sockets created before the patch would block the whole worker).

Environment: ``EMOTIONS_API_BIND`` (default ``0.0.0.0:8000``), ``EMOTIONS_API_WORKERS``
(default 2), ``EMOTIONS_API_CONNECTIONS`` (open connections per worker, default 1000).
"""

from __future__ import annotations

import os

bind = [os.environ.get("EMOTIONS_API_BIND", "0.0.0.0:8000")]
workers = int(os.environ.get("EMOTIONS_API_WORKERS", "2"))
#: gevent workers whose own errors (request line too long, bad headers) answer in the API's
#: JSON error shape with its security headers; see :mod:`api.server`.
worker_class = "api.server.ApiWorker"
#: Simultaneous connections per worker (idle ones included); more wait in the listen backlog.
worker_connections = int(os.environ.get("EMOTIONS_API_CONNECTIONS", "1000"))
#: Seconds a worker may go without telling the master it is alive. Greenlets report while a
#: large upload streams in; only CPU-bound work longer than this (none is) would trip it.
timeout = 300
#: Seconds an idle keep-alive connection stays open, and the deadline for each request's line
#: and headers to arrive (slow-loris clients are cut off after it).
keepalive = 5
#: A request line up to 8 KiB (long query strings), at most 100 headers of at most 8 KiB each;
#: above these gunicorn answers 414 or 431 (as JSON, see :mod:`api.server`).
limit_request_line = 8190
limit_request_fields = 100
limit_request_field_size = 8190
#: Every line of gunicorn's error and access logs goes through the one secret redactor.
logger_class = "api.server.RedactingLogger"
#: Access log on stdout for ``docker logs``; the launcher passes ``--access-logfile`` itself.
accesslog = os.environ.get("EMOTIONS_API_ACCESS_LOG", "-") or None
