"""Who is alive and what it serves: heartbeats of idle and busy processes, swaps reported at once
(issues: an idle worker looked dead; a promoted version showed only after the next task; a
stopped worker stayed listed for five minutes)."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs.schema import WorkerState
from face_emotions.jobs.schema import utcnow
from face_emotions.jobs.worker_heartbeats import INFERENCE
from face_emotions.jobs.worker_heartbeats import LIVENESS_SECONDS
from face_emotions.jobs.worker_heartbeats import TRAINING
from face_emotions.jobs.worker_heartbeats import Beat
from face_emotions.jobs.worker_heartbeats import Heartbeat
from face_emotions.jobs.worker_heartbeats import live_workers
from face_emotions.jobs.worker_heartbeats import touch_worker
from face_emotions.serving.model_holder import ModelHolder
from face_emotions.serving.model_holder import ServingModel
from face_emotions.settings import Settings


@pytest.fixture
def sessions(jobs_db: sessionmaker[Session]) -> sessionmaker[Session]:
    return jobs_db


def rows(sessions: sessionmaker[Session]) -> dict[str, WorkerState]:
    with sessions() as session:
        return {row.name: row for row in session.query(WorkerState)}


def test_an_idle_process_is_alive_and_a_stopped_one_is_gone(
    sessions: sessionmaker[Session],
) -> None:
    heartbeat = Heartbeat(
        sessions, "host:1", role=INFERENCE, state=lambda: Beat(3, "cpu", "onnx"), period=60
    )
    heartbeat.start()
    for _ in range(100):
        if "host:1" in rows(sessions):
            break
        heartbeat._stop.wait(0.05)
    row = rows(sessions)["host:1"]
    assert (row.model_version, row.device, row.backend, row.role) == (3, "cpu", "onnx", INFERENCE)
    heartbeat.stop()
    assert "host:1" not in rows(sessions), "a stopped process stays listed"


def test_live_workers_by_role_and_liveness(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        touch_worker(session, "host:1", model_version=1, device=None, backend=None)
        touch_worker(
            session, "trainer@h", model_version=None, device=None, backend=None, role=TRAINING,
            data_root="/data",
        )  # fmt: skip
        touch_worker(session, "host:2", model_version=1, device=None, backend=None)
        session.query(WorkerState).filter_by(name="host:2").update(
            {"last_seen": utcnow() - timedelta(seconds=LIVENESS_SECONDS + 5)}
        )
        session.commit()
        assert [w.name for w in live_workers(session, role=INFERENCE)] == ["host:1"]
        [trainer] = live_workers(session, role=TRAINING)
        assert (trainer.name, trainer.data_root) == ("trainer@h", "/data")
        assert [w.name for w in live_workers(session)] == ["host:1", "trainer@h"]


def test_an_idle_holder_swaps_to_a_loaded_version_and_says_so(tmp_path: Path) -> None:
    """The refresher thread of an idle worker calls ``poll``: the version that finished loading
    is served (and reported) without waiting for the next task."""
    swapped: list[int] = []
    holder = ModelHolder(
        Settings(var_dir=tmp_path, device="cpu"),
        registry_factory=lambda: SimpleNamespace(),  # type: ignore[arg-type,return-value]
        on_swap=swapped.append,
    )
    holder._current = ServingModel(1, SimpleNamespace(backend="onnx"))  # type: ignore[arg-type]
    holder._next_check = float("inf")  # no new load is due
    holder.poll()
    assert holder.serving_version == 1 and swapped == []
    holder._ready = ServingModel(2, SimpleNamespace(backend="onnx"))  # type: ignore[arg-type]
    holder.poll()
    assert holder.serving_version == 2 and swapped == [2]
    assert holder.current().version == 2 and swapped == [2], "a swap is reported once"
