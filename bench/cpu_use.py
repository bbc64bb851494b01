"""Who used the CPU during one measured run: the worker's pool and main processes, the API,
this benchmark, and everything else on the machine.

A job that runs slower in the Celery worker than the same chunk code in this process is either
doing more work per image (more CPU seconds per image) or getting less of the machine (its
cores busy with the API, Redis, the benchmark's polling, a neighbour). CPU seconds per image and
the cores each part kept busy tell the two apart, where wall times alone cannot.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field

#: The processes of one part, looked up when the run starts (pool processes can be replaced).
Finder = Callable[[], list[int]]


@dataclass
class CpuUse:
    """CPU seconds of each part over ``wall`` seconds; ``machine`` is every core's busy time."""

    wall: float = 0.0
    machine: float = 0.0
    parts: dict[str, float] = field(default_factory=dict)

    @property
    def other(self) -> float:
        """Busy time of every process not in a named part (Redis, the kernel, neighbours)."""
        return max(0.0, self.machine - sum(self.parts.values()))

    def as_dict(self) -> dict[str, float]:
        return {
            "wall": round(self.wall, 3),
            "machine": round(self.machine, 3),
            **{name: round(seconds, 3) for name, seconds in self.parts.items()},
            "other": round(self.other, 3),
        }


def process_tree(pid: int, *, children_only: bool = False) -> list[int]:
    """``pid`` and its descendants (only the descendants with ``children_only``)."""
    import psutil

    try:
        root = psutil.Process(pid)
        children = [child.pid for child in root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []
    return children if children_only else [pid, *children]


def this_process() -> list[int]:
    return [os.getpid()]


def _process_seconds(pids: list[int]) -> dict[int, float]:
    import psutil

    seconds = {}
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied):
            times = psutil.Process(pid).cpu_times()
            seconds[pid] = times.user + times.system
    return seconds


def _machine_busy() -> float:
    import psutil

    times = psutil.cpu_times()
    return sum(times) - times.idle - getattr(times, "iowait", 0.0)


@contextlib.contextmanager
def measure_cpu(parts: Mapping[str, Finder]) -> Iterator[CpuUse]:
    """Fill a :class:`CpuUse` over the ``with`` block.

    Each part's processes are found at the start and read again at the end; a process gone by
    then (a recycled pool process) counts nothing, rather than a guess.
    """
    use = CpuUse()
    pids = {name: find() for name, find in parts.items()}
    before = {name: _process_seconds(found) for name, found in pids.items()}
    machine = _machine_busy()
    started = time.perf_counter()
    try:
        yield use
    finally:
        use.wall = time.perf_counter() - started
        use.machine = _machine_busy() - machine
        for name, found in pids.items():
            after = _process_seconds(found)
            use.parts[name] = sum(
                after[pid] - before[name][pid] for pid in after if pid in before[name]
            )
