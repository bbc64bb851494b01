"""When the serving model changes: a requested reload is awaited, a periodic one is not."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from types import SimpleNamespace

from face_emotions.serving.model_holder import ModelHolder
from face_emotions.serving.model_holder import ServingModel
from face_emotions.settings import Settings


class SlowLoads:
    """A registry whose alias names ``version``; building a version takes ``seconds``."""

    def __init__(self, version: int, seconds: float) -> None:
        self.version = version
        self.seconds = seconds
        self.builds = threading.Event()

    def alias_version(self):
        return SimpleNamespace(version=self.version, name="face-emotion")


def holder_serving_v1(tmp_path: Path, registry: SlowLoads, generation: list[int]) -> ModelHolder:
    holder = ModelHolder(
        Settings(var_dir=tmp_path, device="cpu", model_refresh_seconds=3600),
        registry_factory=lambda: registry,  # type: ignore[arg-type,return-value]
        reload_generation=lambda: generation[0],
    )

    def build(info) -> ServingModel:
        registry.builds.set()
        time.sleep(registry.seconds)
        return ServingModel(info.version, SimpleNamespace(backend="onnx"))  # type: ignore[arg-type]

    holder._build = build  # type: ignore[method-assign]
    holder._current = ServingModel(1, SimpleNamespace(backend="onnx"))  # type: ignore[arg-type]
    holder._next_check = time.monotonic() + 3600
    return holder


def test_the_batch_after_a_promotion_is_served_by_the_new_version(tmp_path: Path) -> None:
    generation = [0]
    holder = holder_serving_v1(tmp_path, SlowLoads(2, 0.5), generation)
    assert holder.current().version == 1
    generation[0] += 1  # a promotion's broadcast arrived
    assert holder.current().version == 2, "a job submitted after promote got the old version"


def test_a_periodic_check_never_makes_a_batch_wait(tmp_path: Path) -> None:
    registry = SlowLoads(2, 0.5)
    holder = holder_serving_v1(tmp_path, registry, [0])
    holder._next_check = 0.0  # the periodic check is due
    assert holder.current().version == 1  # served at once while v2 loads
    assert registry.builds.wait(5)
    holder._loader.join(5)  # type: ignore[union-attr]
    assert holder.current().version == 2


def test_an_idle_poll_starts_the_requested_load_and_the_next_batch_waits(tmp_path: Path) -> None:
    generation = [0]
    holder = holder_serving_v1(tmp_path, SlowLoads(2, 0.5), generation)
    generation[0] += 1
    holder.poll()  # the idle refresher noticed the request first
    assert holder.serving_version == 1
    assert holder.current().version == 2


def test_a_request_for_the_version_already_served_costs_nothing(tmp_path: Path) -> None:
    generation = [0]
    registry = SlowLoads(1, 5.0)
    holder = holder_serving_v1(tmp_path, registry, generation)
    generation[0] += 1
    assert holder.current().version == 1
    assert not registry.builds.is_set()
