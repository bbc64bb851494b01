"""Interleaved repetitions and medians: the only timing primitives the benchmark uses.

Running all repetitions of A and then all of B lets a neighbour's load burst land on one side
only; alternating A/B/A/B (and rotating which goes first) spreads it over both, and the median
discards the repetition a burst hit hardest.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field


@dataclass
class Samples:
    """Seconds per repetition of one variant, with the work (images) one repetition does."""

    items: int
    seconds: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def rate(self) -> float:
        """Items per second of the median repetition."""
        return self.items / self.median if self.median > 0 else float("inf")

    def as_dict(self) -> dict[str, object]:
        return {
            "items": self.items,
            "seconds": [round(s, 4) for s in self.seconds],
            "median_seconds": round(self.median, 4),
            "items_per_second": round(self.rate, 2),
        }


def interleave(
    variants: Mapping[str, Callable[[], float | None]],
    items: Mapping[str, int] | int,
    reps: int,
) -> dict[str, Samples]:
    """Run each variant ``reps`` times, alternating, rotating the order every repetition.

    A variant returns its own duration in seconds (for work timed elsewhere, e.g. a job's
    submit-to-finished), or None to be timed here with ``perf_counter``.
    """
    names = list(variants)
    counts = {n: items if isinstance(items, int) else items[n] for n in names}
    samples = {n: Samples(counts[n]) for n in names}
    for rep in range(reps):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            started = time.perf_counter()
            measured = variants[name]()
            elapsed = time.perf_counter() - started if measured is None else measured
            samples[name].seconds.append(elapsed)
    return samples


def speedup(fast: Samples, slow: Samples) -> float:
    """How many times more items per second ``fast`` did than ``slow``."""
    return fast.rate / slow.rate


def paired_ratios(numerator: Samples, denominator: Samples) -> list[float]:
    """Rate ratio of each repetition pair: shows how stable a ratio is across repetitions."""
    pairs: Sequence[tuple[float, float]] = list(
        zip(numerator.seconds, denominator.seconds, strict=False)
    )
    return [round((numerator.items / a) / (denominator.items / b), 3) for a, b in pairs if a and b]
