"""The benchmark's CPU accounting: who used the cores during a run, per image."""

from __future__ import annotations

import os
import time

from bench.cpu_use import CpuUse
from bench.cpu_use import measure_cpu
from bench.cpu_use import process_tree
from bench.cpu_use import this_process
from bench.figures.pipeline import _cpu_story
from bench.figures.pipeline import _cpu_table


def test_a_part_is_charged_its_own_cpu_seconds() -> None:
    with measure_cpu({"benchmark": this_process, "nobody": list}) as use:
        spent = time.process_time()
        while time.process_time() - spent < 0.2:  # 0.2 s of this process's CPU, however long
            pass
    assert use.parts["benchmark"] >= 0.15
    assert use.parts["nobody"] == 0.0
    assert use.machine >= use.parts["benchmark"] * 0.9  # every core's busy time includes it
    assert use.wall > 0 and use.other >= 0


def test_a_process_tree_holds_the_root_unless_only_children_are_asked_for() -> None:
    assert process_tree(os.getpid())[0] == os.getpid()
    assert os.getpid() not in process_tree(os.getpid(), children_only=True)


def _use(wall: float, machine: float, **parts: float) -> CpuUse:
    return CpuUse(wall, machine, dict(parts))


def test_the_table_gives_cpu_per_image_and_cores_busy_by_part() -> None:
    chunk = [_use(10.0, 18.0, benchmark=17.0), _use(12.0, 19.0, benchmark=18.0)]
    jobs = [
        _use(10.0, 18.0, **{"worker pool": 16.0, "API": 0.5}),
        _use(11.0, 18.5, **{"worker pool": 16.5, "API": 0.4}),
        _use(12.0, 19.0, **{"worker pool": 17.0, "API": 0.6}),
    ]
    table = {(r["run"], r["part"]): r for r in _cpu_table(1000, chunk, jobs)}
    # Medians: of 17 and 18 s the upper one (even count), of 16, 16.5 and 17 s the middle one.
    assert table[("chunk code in-process", "this process")]["CPU ms/image"] == "18.0"
    assert table[("REST job", "worker pool")]["CPU ms/image"] == "16.5"
    assert table[("REST job", "worker pool")]["cores busy"] == "1.50"
    assert table[("REST job", "API")]["CPU ms/image"] == "0.5"
    assert table[("REST job", "rest of the machine")]["CPU ms/image"] == "1.5"
    story = _cpu_story(list(table.values()))
    assert "18.0 ms in this process" in story and "16.5 ms in the worker's pool process" in story
    assert "API 0.05" in story  # 0.05, 0.036, 0.05 cores
