"""Several GPUs per host (issue 15, item 4): one prefork pool process per GPU, pool process i on
GPU i % n, EMOTIONS_DEVICE=cuda:N forcing one, EMOTIONS_WORKER_PROCESSES sizing the pool.

Nothing here has a GPU: the assignment is pure, and torch's device count is faked where it is
read (``torch.cuda.device_count`` / ``is_available``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pydantic import ValidationError

from face_emotions.serving.device_assignment import assign_device
from face_emotions.serving.device_assignment import cuda_device_count
from face_emotions.serving.device_assignment import parse_device
from face_emotions.serving.device_assignment import worker_processes
from face_emotions.serving.model_holder import ModelHolder
from face_emotions.serving.predictor import resolve_device
from face_emotions.settings import Settings


def devices(requested: str, processes: int, gpus: int) -> list[str]:
    return [assign_device(requested, index, gpus) for index in range(processes)]


# -- the assignment ---------------------------------------------------------------------------


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_four_gpus_four_processes_one_each(requested: str) -> None:
    assert devices(requested, 4, 4) == ["cuda:0", "cuda:1", "cuda:2", "cuda:3"]


def test_more_processes_than_gpus_go_round_robin() -> None:
    assert devices("auto", 5, 2) == ["cuda:0", "cuda:1", "cuda:0", "cuda:1", "cuda:0"]


def test_cuda_n_forces_every_process_onto_that_gpu() -> None:
    assert devices("cuda:1", 4, 4) == ["cuda:1"] * 4


def test_cpu_keeps_every_process_on_the_cpu_whatever_the_gpus() -> None:
    assert devices("cpu", 3, 4) == ["cpu"] * 3


def test_auto_without_a_gpu_is_the_cpu() -> None:
    assert devices("auto", 3, 0) == ["cpu"] * 3


@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_cuda_without_a_gpu_is_an_error_not_a_fallback(requested: str) -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        assign_device(requested, 0, 0)


def test_a_gpu_beyond_the_visible_ones_is_an_error() -> None:
    with pytest.raises(RuntimeError, match=r"only 2 CUDA device\(s\) are visible"):
        assign_device("cuda:2", 0, 2)
    assert assign_device("cuda:1", 0, 2) == "cuda:1"


@pytest.mark.parametrize("requested", ["cuda:x", "cuda:", "gpu", "cuda:-1", "cuda1", ""])
def test_a_malformed_device_is_refused_by_name(requested: str) -> None:
    with pytest.raises(ValueError, match="not one of auto, cpu, cuda or cuda:N"):
        assign_device(requested, 0, 4)
    with pytest.raises(ValidationError, match="device"):
        Settings(device=requested)


def test_device_names() -> None:
    assert parse_device("cuda:12") == ("cuda", 12)
    assert parse_device("auto") == ("auto", None)
    assert Settings(device="cuda:3").device == "cuda:3"


# -- how many pool processes ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "requested", "gpus", "expected"),
    [
        ("auto", "auto", 4, 4),  # one per GPU
        ("auto", "cuda", 2, 2),
        ("auto", "auto", 0, 1),  # a CPU host
        ("auto", "cpu", 4, 1),  # forced onto the CPU
        ("auto", "cuda:1", 4, 1),  # forced onto one GPU: one process
        (3, "auto", 4, 3),  # an explicit number wins
        (2, "cpu", 0, 2),
    ],
)
def test_worker_processes(setting: int | str, requested: str, gpus: int, expected: int) -> None:
    assert worker_processes(setting, requested, gpus) == expected  # type: ignore[arg-type]


def test_worker_processes_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert Settings().worker_processes == "auto"
    monkeypatch.setenv("EMOTIONS_WORKER_PROCESSES", "3")
    assert Settings().worker_processes == 3
    for bad in ("0", "many"):
        monkeypatch.setenv("EMOTIONS_WORKER_PROCESSES", bad)
        with pytest.raises(ValidationError):
            Settings()


# -- torch's count, faked ---------------------------------------------------------------------


@pytest.fixture
def gpus(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """``gpus[0]``: how many CUDA devices torch reports (0: CUDA unavailable)."""
    count = [0]
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count[0])
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count[0] > 0)
    yield count


def test_the_count_never_asks_the_cuda_runtime(
    gpus: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """is_available() initialises CUDA (cuInit): a worker's main process must not call it before
    it forks; device_count() asks NVML."""

    def poisons_fork() -> bool:
        raise AssertionError("torch.cuda.is_available() called before the fork")

    monkeypatch.setattr(torch.cuda, "is_available", poisons_fork)
    gpus[0] = 3
    assert cuda_device_count() == 3


def test_resolve_device_follows_the_process_index(gpus: list[int]) -> None:
    gpus[0] = 2
    assert resolve_device("auto", 3) == torch.device("cuda:1")
    assert resolve_device("cuda") == torch.device("cuda:0")
    assert resolve_device("cuda:1", 0) == torch.device("cuda:1")
    with pytest.raises(RuntimeError, match="only 2"):
        resolve_device("cuda:2")
    gpus[0] = 0
    assert resolve_device("auto", 3) == torch.device("cpu")


def test_the_model_holder_uses_the_process_device_not_the_setting(
    gpus: list[int], tmp_path: Path
) -> None:
    gpus[0] = 4
    settings = Settings(var_dir=tmp_path, device="auto")
    holder = ModelHolder(settings, device="cuda:2")
    assert holder.device == torch.device("cuda:2")
    assert holder.describe()["device"] == "cuda:2"
    assert ModelHolder(settings).device == torch.device("cuda:0")  # no device: process 0's


# -- the worker's pool processes --------------------------------------------------------------


@pytest.fixture
def runtime(monkeypatch: pytest.MonkeyPatch, gpus: list[int]):
    from worker import runtime

    monkeypatch.setattr(runtime, "_DEVICE", [])
    monkeypatch.setattr(runtime, "_BUILT", [])
    return runtime


def use_settings(monkeypatch: pytest.MonkeyPatch, module, **values) -> None:
    settings = Settings(**values)
    monkeypatch.setattr(module, "get_settings", lambda: settings)


@pytest.mark.parametrize(("requested", "expected"), [("auto", "cuda:1"), ("cuda:0", "cuda:0")])
def test_a_pool_process_is_pinned_at_its_init(
    runtime, gpus: list[int], monkeypatch: pytest.MonkeyPatch, requested: str, expected: str
) -> None:
    """worker_process_init: pool process 3 of a two-GPU worker takes GPU 1 (3 % 2), and its
    heartbeat says so before it loaded a model."""
    import billiard.process

    from worker import app as worker_app

    gpus[0] = 2
    use_settings(monkeypatch, runtime, device=requested)
    monkeypatch.setattr(billiard.process, "current_process", lambda: SimpleNamespace(index=3))
    monkeypatch.setattr(runtime, "start_heartbeat", lambda: None)
    monkeypatch.setattr(worker_app.SWEEPER, "forget_after_fork", lambda: None)
    worker_app._init_pool_process()
    assert runtime.process_device() == expected
    assert runtime._serving().device == expected


def test_the_model_and_the_face_detector_load_on_the_process_device(
    runtime, gpus: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not on EMOTIONS_DEVICE's first GPU: on the one this pool process was given."""
    gpus[0] = 2
    use_settings(monkeypatch, runtime, device="auto", model_refresh_seconds=0)
    runtime.assign_process_device(1)
    built: dict[str, object] = {}
    monkeypatch.setattr(
        runtime, "ModelHolder", lambda settings, **kwargs: built.update(holder=kwargs["device"])
    )
    monkeypatch.setattr(
        runtime.FaceDetector,
        "from_settings",
        lambda settings, device: built.update(detector=device),
    )
    runtime.holder.__wrapped__()  # the builder itself, not the process-wide cached one
    runtime.detector.__wrapped__()
    assert built == {"holder": "cuda:1", "detector": "cuda:1"}


def test_a_main_process_is_process_0() -> None:
    from worker.app import pool_process_index

    assert pool_process_index() == 0  # pytest's own process: billiard's main process


def test_a_device_the_host_cannot_serve_is_logged_and_fails_the_model_load(
    runtime, gpus: list[int], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    gpus[0] = 2
    use_settings(monkeypatch, runtime, device="cuda:5")
    with caplog.at_level(logging.ERROR, logger="worker.runtime"):
        assert runtime.assign_process_device(1) is None
    assert "only 2 CUDA device(s)" in caplog.text
    assert runtime._serving().device is None
    with pytest.raises(RuntimeError, match="only 2"):
        runtime.process_device()


def test_a_threads_pool_shares_the_device_of_process_0(
    runtime, gpus: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    gpus[0] = 4
    use_settings(monkeypatch, runtime, device="auto")
    assert runtime.process_device() == "cuda:0"  # no worker_process_init: process 0's device


# -- worker_concurrency -----------------------------------------------------------------------


@pytest.fixture
def started_worker(
    monkeypatch: pytest.MonkeyPatch, gpus: list[int]
) -> Iterator[Callable[..., tuple[int, type] | None]]:
    """Runs ``celery -A worker.app worker ARGS`` as far as the worker's ``start()`` and returns
    the pool size and pool class it would start with (``None`` if it never got there)."""
    from celery.apps import worker as celery_worker
    from click.testing import CliRunner

    # Before the worker starts: its import_modules handler must find prometheus_client
    # imported and leave this process's metrics alone.
    import face_emotions.ops.inference_metrics  # noqa: F401
    from worker.app import app

    before = app.conf.worker_concurrency
    # Process-wide side effects of a real worker (current app, patched Task.__call__).
    monkeypatch.setattr(celery_worker.trace, "setup_worker_optimizations", lambda *a, **k: None)
    seen: list[tuple[int, type]] = []
    monkeypatch.setattr(
        celery_worker.Worker, "start", lambda self: seen.append((self.concurrency, self.pool_cls))
    )

    def start(*args: str) -> tuple[int, type] | None:
        from celery.bin.celery import celery

        seen.clear()
        app.conf.worker_concurrency = None  # as in a fresh process
        result = CliRunner().invoke(celery, ["-A", "worker.app", "worker", *args])
        assert result.exit_code == 0, result.output
        return seen[0] if seen else None

    yield start
    app.conf.worker_concurrency = before


def test_auto_runs_one_pool_process_per_gpu_and_the_command_line_wins(
    started_worker, gpus: list[int]
) -> None:
    from billiard import cpu_count
    from celery.concurrency.prefork import TaskPool as PreforkPool
    from celery.concurrency.thread import TaskPool as ThreadPool

    gpus[0] = 4
    assert started_worker() == (4, PreforkPool)
    assert started_worker("--concurrency", "2") == (2, PreforkPool)
    gpus[0] = 0
    assert started_worker() == (1, PreforkPool)
    # Threads: auto leaves Celery's default (the CPUs), --concurrency sets the threads, which
    # share one device.
    gpus[0] = cpu_count() + 3
    assert started_worker("--pool", "threads") == (cpu_count(), ThreadPool)
    assert started_worker("--pool", "threads", "-c", "3") == (3, ThreadPool)


def test_an_explicit_process_count_sizes_the_pool(
    started_worker, gpus: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    from worker import app as worker_app

    gpus[0] = 4
    monkeypatch.setattr(worker_app, "settings", Settings(worker_processes=3))
    assert started_worker()[0] == 3
    assert started_worker("-c", "5")[0] == 5
