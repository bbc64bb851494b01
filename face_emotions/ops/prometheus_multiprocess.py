"""Prometheus multiprocess mode: the directory every process writes its samples to.

A Celery prefork worker (and gunicorn with several workers) is several processes: each one
writes its counters to memory-mapped files under ``PROMETHEUS_MULTIPROC_DIR`` and the process
that serves ``/metrics`` adds them up (:func:`multiprocess_registry`).

prometheus-client picks between in-process and multiprocess values when ``prometheus_client``
is first imported, so the variable must be in the environment before that: this module never
imports it at module level, and :func:`prepare_multiprocess_dir` warns when it is called too late.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"
_TEMP_PREFIX = "face-emotions-metrics-"


def prepare_multiprocess_dir(path: Path | None = None) -> Path:
    """Export ``path`` (created, emptied of old samples) or a fresh temporary directory as
    ``PROMETHEUS_MULTIPROC_DIR`` and return it.

    Only ``*.db`` sample files are removed from an existing ``path``: samples of a previous
    run would otherwise be added to this one's, and counters would include a dead worker's.
    """
    if path is None:
        directory = Path(tempfile.mkdtemp(prefix=_TEMP_PREFIX))
    else:
        directory = Path(path).expanduser().resolve()
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.db"):
            stale.unlink(missing_ok=True)
    os.environ[ENV] = str(directory)
    if not multiprocess_mode_active():
        log.warning(
            "prometheus_client was imported before %s was set: metrics of this process's "
            "children will not reach %s",
            ENV,
            directory,
        )
    return directory


def multiprocess_mode_active() -> bool:
    """True unless ``prometheus_client`` is already imported in single-process mode."""
    values = sys.modules.get("prometheus_client.values")
    if values is None:
        return True  # not imported yet: it will read the variable when it is
    return bool(getattr(values.ValueClass, "_multiprocess", False))


def is_temporary(path: Path) -> bool:
    """Whether ``path`` is a directory :func:`prepare_multiprocess_dir` made with mkdtemp."""
    return path.parent == Path(tempfile.gettempdir()) and path.name.startswith(_TEMP_PREFIX)


def remove_multiprocess_dir(path: Path) -> None:
    """Delete a temporary directory of ours (never a configured one) and forget the variable."""
    if os.environ.get(ENV) == str(path):
        del os.environ[ENV]
    if is_temporary(path):
        shutil.rmtree(path, ignore_errors=True)


def mark_process_dead(pid: int, path: Path | str | None = None) -> None:
    """Drop the live gauges of a pool process that exited (its counters stay: they count)."""
    from prometheus_client import multiprocess

    directory = path or os.environ.get(ENV)
    if directory:
        multiprocess.mark_process_dead(pid, str(directory))


def prune_dead_processes(path: Path | str) -> list[int]:
    """Mark dead every process with live-gauge files that no longer runs (a pool process
    killed with SIGKILL never says goodbye); returns their pids."""
    dead: list[int] = []
    for file in Path(path).glob("gauge_live*_*.db"):
        try:
            pid = int(file.stem.rsplit("_", 1)[1])
        except ValueError:
            continue
        if pid not in dead and not _alive(pid):
            dead.append(pid)
    for pid in dead:
        mark_process_dead(pid, path)
    return dead


def multiprocess_registry(path: Path | str) -> Any:
    """A registry that serves the sum of every process's samples under ``path``.

    Dead processes' live gauges are dropped at each scrape, so a worker's model-version
    gauge disappears with its process even when the process was killed.
    """
    from prometheus_client import CollectorRegistry

    registry = CollectorRegistry()
    registry.register(_LiveProcessesCollector(str(path)))
    return registry


class _LiveProcessesCollector:
    """prometheus-client's MultiProcessCollector, pruning dead processes before each read."""

    def __init__(self, path: str) -> None:
        from prometheus_client.multiprocess import MultiProcessCollector

        self.path = path
        self._files = MultiProcessCollector(None, path=path)

    def collect(self) -> Any:
        prune_dead_processes(self.path)
        return self._files.collect()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
