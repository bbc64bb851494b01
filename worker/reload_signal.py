"""The reload request that travels from a worker's main process to its pool processes.

Promotion broadcasts reach the main process (Celery's remote control runs there); pool
processes, forked from it, share this counter and re-check the serving alias at their next
micro-batch when it has moved. Kept free of heavy imports: ``worker.app`` imports it before
the task modules (and with them prometheus-client, which must see its multiprocess directory
first).
"""

from __future__ import annotations

import multiprocessing

RELOAD_GENERATION = multiprocessing.Value("L", 0)


def request_reload() -> int:
    """Move the counter; returns the new generation."""
    with RELOAD_GENERATION.get_lock():
        RELOAD_GENERATION.value += 1
        return int(RELOAD_GENERATION.value)


def reload_generation() -> int:
    return int(RELOAD_GENERATION.value)
