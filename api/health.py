"""Liveness (``/healthz``: the process answers) and readiness (``/readyz``: it can work).

Orchestrators restart a container whose liveness fails, so it checks nothing external: a
database outage must not restart every API replica. Readiness checks the three dependencies
a request needs and takes the replica out of rotation while one is down; each check has a
deadline so a hanging dependency can't hang the probe. It also warns (without failing) when no
worker or trainer is consuming its queue, since work would then wait for ever.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from apiflask import APIBlueprint
from sqlalchemy import text

from api.extensions import Services
from api.extensions import services
from api.openapi_docs import Responses
from api.openapi_docs import response_doc
from api.schemas.common import HealthOut
from api.schemas.common import ReadyOut
from api.training_runs import trainer_problem
from face_emotions.jobs import worker_heartbeats

bp = APIBlueprint("health", __name__, tag="health")

CHECK_TIMEOUT_SECONDS = 5.0
# Not an error body: a 503 still carries the checks, so it only gets a description.
READY_RESPONSES: Responses = {503: response_doc("A dependency is down (see checks)")}


@bp.get("/healthz")
@bp.output(HealthOut)
def healthz() -> dict[str, str]:
    """Liveness: the process is up"""
    return {"status": "ok"}


@bp.get("/readyz")
@bp.output(ReadyOut, description="Every dependency answers")
@bp.doc(responses=READY_RESPONSES)
def readyz() -> tuple[dict[str, Any], int]:
    """Readiness: database, broker and model registry answer"""
    state = services()
    checks = run_checks(
        {
            "database": lambda: _check_database(state),
            "broker": state.broker.ping,
            "registry": lambda: _check_registry(state),
        },
        timeout=CHECK_TIMEOUT_SECONDS,
    )
    ready = all(value == "ok" for value in checks.values())
    body: dict[str, Any] = {"status": "ready" if ready else "unavailable", "checks": checks}
    if checks.get("database") == "ok":
        body["warnings"] = consumer_warnings(state)
    return body, (200 if ready else 503)


def consumer_warnings(state: Services) -> list[str]:
    """What would make work wait although the API is ready: nobody consuming a queue.

    Informational: the API accepts jobs and runs without workers or trainers (they queue), so
    neither takes the replica out of rotation.
    """
    with state.sessions() as session:
        warnings = []
        stale_seconds = state.settings.worker_stale_seconds
        if not worker_heartbeats.live_workers(
            session, role=worker_heartbeats.INFERENCE, stale_seconds=stale_seconds
        ):
            warnings.append(
                f"no inference worker has reported in the last {stale_seconds:g} s: jobs stay "
                "queued until one starts (celery -A worker.app worker -Q inference)"
            )
        trainers = trainer_problem(session, state.settings)
        if trainers is not None:
            warnings.append(trainers)
        return warnings


def _check_database(state: Services) -> bool:
    with state.sessions() as session:
        session.execute(text("SELECT 1"))
    return True


def _check_registry(state: Services) -> bool:
    registry = state.registry()
    client = getattr(registry, "client", None)
    if client is not None:
        client.search_registered_models(max_results=1)
    return True


def run_checks(checks: dict[str, Callable[[], bool]], *, timeout: float) -> dict[str, str]:
    """Run the checks in parallel; each reports "ok", "unreachable", "failed: X" or a timeout.

    Daemon threads, because a check stuck in a connect() can't be cancelled: it is abandoned
    and the probe answers on time.
    """
    outcomes: dict[str, str] = {}
    lock = threading.Lock()

    def runner(name: str, check: Callable[[], bool]) -> None:
        try:
            outcome = "ok" if check() else "unreachable"
        except Exception as exc:
            outcome = f"failed: {type(exc).__name__}"
        with lock:
            outcomes[name] = outcome

    threads = [
        threading.Thread(target=runner, args=(name, check), daemon=True, name=f"readyz-{name}")
        for name, check in checks.items()
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(deadline - time.monotonic(), 0.0))
    with lock:
        return {name: outcomes.get(name, f"timed out after {timeout:g}s") for name in checks}
