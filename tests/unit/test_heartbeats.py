"""Who is alive and what it serves: heartbeats of idle and busy processes, swaps reported at once
(issues: an idle worker looked dead; a promoted version showed only after the next task; a
stopped worker stayed listed for five minutes; issue 14: idle/busy state, a stale time that is
a setting)."""

from __future__ import annotations

import threading
from datetime import timedelta
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy.orm import Session
from sqlalchemy.orm import sessionmaker

from face_emotions.jobs import worker_heartbeats
from face_emotions.jobs.schema import WorkerState
from face_emotions.jobs.schema import utcnow
from face_emotions.jobs.worker_heartbeats import BUSY
from face_emotions.jobs.worker_heartbeats import HEARTBEAT_SECONDS
from face_emotions.jobs.worker_heartbeats import IDLE
from face_emotions.jobs.worker_heartbeats import INFERENCE
from face_emotions.jobs.worker_heartbeats import LIVENESS_SECONDS
from face_emotions.jobs.worker_heartbeats import TRAINING
from face_emotions.jobs.worker_heartbeats import Beat
from face_emotions.jobs.worker_heartbeats import Heartbeat
from face_emotions.jobs.worker_heartbeats import heartbeat_period
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


def wait_for_row(sessions: sessionmaker[Session], name: str, **expected: object) -> WorkerState:
    """The row once it says ``expected`` (a heartbeat thread writes it), failing after 5 s."""
    for _ in range(100):
        row = rows(sessions).get(name)
        if row is not None and all(getattr(row, k) == v for k, v in expected.items()):
            return row
        threading.Event().wait(0.05)
    raise AssertionError(f"{name} never said {expected}: {rows(sessions).get(name)}")


def test_the_beat_period_follows_the_stale_time() -> None:
    """Issue 14: EMOTIONS_WORKER_STALE_SECONDS sets when a silent process drops out; every
    process must beat well within it, or a live idle one would flicker out of the list."""
    assert Settings().worker_stale_seconds == LIVENESS_SECONDS == 60
    assert heartbeat_period() == HEARTBEAT_SECONDS == 15
    assert heartbeat_period(3) == 0.75
    assert heartbeat_period(600) == HEARTBEAT_SECONDS
    with pytest.raises(ValueError):
        Settings(worker_stale_seconds=0)


def test_stale_time_decides_who_is_live(sessions: sessionmaker[Session]) -> None:
    with sessions() as session:
        touch_worker(session, "host:1", model_version=None, device=None, backend=None)
        session.query(WorkerState).update({"last_seen": utcnow() - timedelta(seconds=10)})
        session.commit()
        assert [w.name for w in live_workers(session)] == ["host:1"]
        assert live_workers(session, stale_seconds=5) == []


def test_an_idle_process_says_idle_and_a_busy_one_busy_at_once(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: the row says whether the process works, without waiting for the next period
    (60 s here) once a change has lasted SETTLE_SECONDS."""
    monkeypatch.setattr(worker_heartbeats, "SETTLE_SECONDS", 0.05)
    state = {"now": IDLE}
    heartbeat = Heartbeat(
        sessions, "host:1", role=INFERENCE, state=lambda: Beat(state=state["now"]), period=60
    )
    heartbeat.start()
    try:
        row = wait_for_row(sessions, "host:1", state=IDLE)
        assert row.model_version is None, "an idle process that loaded nothing says so"
        state["now"] = BUSY
        heartbeat.changed()
        wait_for_row(sessions, "host:1", state=BUSY)
        state["now"] = IDLE
        heartbeat.changed()
        wait_for_row(sessions, "host:1", state=IDLE)
    finally:
        heartbeat.stop()


def test_a_pool_process_reports_busy_while_a_task_runs(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import runtime

    monkeypatch.setattr(worker_heartbeats, "SETTLE_SECONDS", 0.05)
    monkeypatch.setattr(runtime, "_BUILT", [])
    monkeypatch.setattr(runtime, "_HEARTBEATS", [])
    heartbeat = Heartbeat(sessions, "host:2", role=INFERENCE, state=runtime._serving, period=60)
    runtime._HEARTBEATS.append(heartbeat)
    heartbeat.start()
    try:
        wait_for_row(sessions, "host:2", state=IDLE, model_version=None)
        with runtime.busy():
            wait_for_row(sessions, "host:2", state=BUSY)
        wait_for_row(sessions, "host:2", state=IDLE)
    finally:
        heartbeat.stop()


def test_a_pool_process_reports_its_gpu_before_it_loads_a_model(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 15: each pool process of a several-GPU worker says which GPU it was pinned to as
    soon as it is alive, not only once its first task loaded the model."""
    from worker import runtime

    monkeypatch.setattr(runtime, "_BUILT", [])
    monkeypatch.setattr(runtime, "_DEVICE", ["cuda:1"])
    heartbeat = Heartbeat(sessions, "host:3", role=INFERENCE, state=runtime._serving, period=60)
    heartbeat.beat()
    row = rows(sessions)["host:3"]
    assert (row.device, row.model_version, row.state) == ("cuda:1", None, IDLE)
    loaded = SimpleNamespace(
        describe=lambda: {"version": 4, "device": "cuda:1", "backend": "torch"}
    )
    monkeypatch.setattr(runtime, "_BUILT", [loaded])
    heartbeat.beat()
    row = rows(sessions)["host:3"]
    assert (row.device, row.model_version, row.backend) == ("cuda:1", 4, "torch")
