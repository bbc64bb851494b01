"""What every figure gets: the run's plan (repetitions, sizes) and its context (arguments,
threads, batch sizes, and where figures, errors and analysis are collected).

Its own module so each figure module can take a :class:`Context` without importing the
entry point (:mod:`bench.run`) that creates it.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from dataclasses import field

from bench.figures import LABELS
from bench.figures import Figure
from bench.figures import unavailable

SMALL_BELOW = 200
FULL_TINY_JOBS = 200
SMALL_TINY_JOBS = 32


@dataclass
class Plan:
    """Repetitions and sizes: the full report vs CI's small proof that everything runs."""

    small: bool
    rounds: int  # limit + pipeline + micro-batching rounds; scale-out rounds
    inproc_reps: int  # backends
    backend_images: int
    allocator_reps: int
    allocator_images: int
    tiny_jobs: int
    tiny_rounds: int

    @classmethod
    def make(cls, images: int, small: bool, reps: int | None) -> Plan:
        if small:
            plan = cls(True, 1, 2, 32, 1, 32, SMALL_TINY_JOBS, 1)
        else:
            plan = cls(False, 3, 5, 256, 5, 128, FULL_TINY_JOBS, 2)
        if reps is not None:
            plan.rounds = plan.tiny_rounds = reps
            plan.inproc_reps = plan.allocator_reps = max(reps, 1)
        return plan


@dataclass
class Context:
    """One run's arguments and sizes, and what its figures produce: each figure records
    itself here, so a figure that breaks is still reported and the others go on."""

    args: argparse.Namespace
    plan: Plan
    threads: int
    batch_size: int
    batch_sizes: list[int]
    figures: dict[str, Figure] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    analysis: list[str] = field(default_factory=list)
    gpu_curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    phases: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Wall time of a step, on stderr and in the JSON: where a slow run spent its time."""
        started = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - started
            self.phases[name] = round(self.phases.get(name, 0.0) + seconds, 1)
            print(f"bench: {name}: {seconds:.1f} s", file=sys.stderr, flush=True)

    def wants(self, *keys: str) -> bool:
        return any(key in self.args.only for key in keys)

    def record(self, figure: Figure) -> None:
        self.figures[figure.key] = figure
        print(figure.line, flush=True)

    def failed(self, key: str, exc: BaseException) -> None:
        """A figure that broke is reported (and fails the run), never silently dropped."""
        text = f"{type(exc).__name__}: {exc}"
        self.errors.append(f"{LABELS[key]}: {text}")
        self.record(unavailable(key, f"error: {text[:400]}"))
        traceback.print_exc(file=sys.stderr)

    def failed_all(self, keys: tuple[str, ...], exc: BaseException) -> None:
        """What a shared step (the services) broke: every wanted figure not yet recorded."""
        for key in keys:
            if self.wants(key) and key not in self.figures:
                self.failed(key, exc)
