"""A worker's Prometheus endpoint: ``http://<worker>:EMOTIONS_WORKER_METRICS_PORT/metrics``.

The metrics themselves are in :mod:`face_emotions.ops.inference_metrics`; the pool processes that
classify images write them to files of a per-worker multiprocess directory, and the worker's
main process serves their sum. The order of events in the main process is what makes it work:

1. ``import_modules`` (before the task modules, hence before ``prometheus_client``, are
   imported): :meth:`WorkerMetrics.prepare` empties or creates the directory
   (``EMOTIONS_WORKER_METRICS_DIR``, else a fresh temporary one) and exports it as
   ``PROMETHEUS_MULTIPROC_DIR``; forked pool processes inherit it.
2. ``worker_ready``: :meth:`WorkerMetrics.serve` starts the HTTP server (a port already taken,
   e.g. by a second worker on the same host, is logged and skipped: the worker still runs).
3. ``worker_process_shutdown`` (in a pool process): its live gauges are dropped.
4. ``worker_shutdown``: the server stops and a temporary directory is removed.

Other ``celery -A worker.app`` commands (Flower, ``inspect``) never start a server; Flower
imports the task modules after its own ``prometheus_client``, so :meth:`prepare` leaves it be.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
from pathlib import Path
from typing import Any

from face_emotions.ops.prometheus_multiprocess import ENV
from face_emotions.ops.prometheus_multiprocess import mark_process_dead
from face_emotions.ops.prometheus_multiprocess import multiprocess_mode_active
from face_emotions.ops.prometheus_multiprocess import multiprocess_registry
from face_emotions.ops.prometheus_multiprocess import prepare_multiprocess_dir
from face_emotions.ops.prometheus_multiprocess import remove_multiprocess_dir
from face_emotions.settings import Settings

log = logging.getLogger(__name__)


class WorkerMetrics:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.directory: Path | None = None
        self.port: int | None = None
        self._server: Any = None
        self._lock = threading.Lock()

    def prepare(self) -> Path | None:
        """Create the multiprocess directory and export it; ``None`` when multiprocess mode
        can't be had any more (``prometheus_client`` already imported) or the directory can't
        be made (then the worker serves its main process's registry only)."""
        if not multiprocess_mode_active():
            log.debug("prometheus_client already imported: no multiprocess metrics here")
            return None
        os.environ.pop(ENV, None)  # never write into a directory inherited from elsewhere
        try:
            self.directory = prepare_multiprocess_dir(self.settings.worker_metrics_dir)
            # ``worker_shutdown`` removes it too; this covers ``celery shell`` and the like.
            atexit.register(self._remove_at_exit, os.getpid())
        except OSError as exc:
            log.warning(
                "worker metrics: cannot prepare %s: %s", self.settings.worker_metrics_dir, exc
            )
            self.directory = None
        return self.directory

    def serve(self) -> int | None:
        """Start ``/metrics`` on ``EMOTIONS_WORKER_METRICS_PORT``; returns the port bound."""
        port = self.settings.worker_metrics_port
        if port == 0:
            return None
        from prometheus_client import REGISTRY
        from prometheus_client import start_http_server

        # The worker's families are served (at zero) before the first chunk imports them.
        import face_emotions.ops.inference_metrics  # noqa: F401

        registry = multiprocess_registry(self.directory) if self.directory else REGISTRY
        with self._lock:
            if self._server is not None:
                return self.port
            try:
                server, _thread = start_http_server(port, registry=registry)
            except OSError as exc:
                log.warning("worker metrics: port %d unavailable, not serving: %s", port, exc)
                return None
            self._server = server
            self.port = server.server_address[1]
        log.info("worker metrics on port %d (/metrics)", self.port)
        return self.port

    def process_exited(self, pid: int) -> None:
        """A pool process is going away: its live gauges (model version) go with it."""
        if self.directory is not None:
            try:
                mark_process_dead(pid, self.directory)
            except OSError as exc:
                log.debug("worker metrics: could not mark %d dead: %s", pid, exc)

    def _remove_at_exit(self, pid: int) -> None:
        if os.getpid() == pid and self.directory is not None:
            remove_multiprocess_dir(self.directory)

    def stop(self) -> None:
        with self._lock:
            server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self.directory is not None:
            remove_multiprocess_dir(self.directory)
