"""``memory``: the pipeline worker's resident memory growth over thousands of images, sampled
after every job the other figures ran on it (and a top-up to 5,000).

The target is the steady state: growth from the end of the first full job to the end. The
first job's own growth (arenas sized for the largest batch, ONNX Runtime's memory pattern, lazy
imports) happens once per process and is reported beside it, not mixed in.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field
from typing import TYPE_CHECKING

from bench.context import Context
from bench.figures import Figure
from bench.figures import unavailable
from bench.figures import verdict_text

if TYPE_CHECKING:
    from bench.services import Worker

MEMORY_IMAGES = 5000


@dataclass
class MemoryTrace:
    """RSS of the pipeline worker's processes after warm-up and after every job it ran since.

    ``points`` are (images classified since warm-up, pool process RSS, main process RSS).
    """

    worker: Worker
    images: int = 0
    points: list[tuple[int, int, int]] = field(default_factory=list)

    def sample(self, images: int = 0) -> None:
        main, pool = self.worker.rss()
        self.images += images
        self.points.append((self.images, pool, main))


def memory_figure(context: Context, trace: MemoryTrace) -> None:
    if len(trace.points) < 3:
        context.record(unavailable("memory", "the worker ran fewer than two jobs after warm-up"))
        return
    _, pool_start, main_start = trace.points[0]
    first_images, pool_first, _ = trace.points[1]
    _, pool_end, main_end = trace.points[-1]
    if not pool_start or not pool_first:
        raise RuntimeError("the worker has no pool process to measure")
    ratio = pool_end / pool_first
    growth = (ratio - 1.0) * 100.0
    first_use = (pool_first / pool_start - 1.0) * 100.0
    steady_images = trace.images - first_images
    main_growth = (main_end / main_start - 1.0) * 100.0 if main_start else 0.0
    peak = max(pool for _, pool, _ in trace.points)
    mib = 2**20
    line = (
        f"worker memory growth: {growth:+.1f}% in steady state over {steady_images} images after "
        f"the first job (first job {first_use:+.1f}%; pool process {pool_start / mib:.0f} -> "
        f"{pool_first / mib:.0f} -> {pool_end / mib:.0f} MiB RSS, peak {peak / mib:.0f}; main "
        f"process {main_growth:+.1f}%) ({verdict_text('memory', growth)})"
    )
    notes = [
        "RSS of the pipeline worker's pool process (the one that holds the model, runs the "
        "tasks, and that worker_max_memory_per_child would recycle) right after its warm-up "
        "jobs, then after every job it ran: pipeline, batch_size=1 and tiny jobs"
        + ("" if context.plan.small else f", then more pipeline jobs up to {MEMORY_IMAGES}"),
        f"the Celery main process went from {main_start / mib:.0f} to {main_end / mib:.0f} MiB",
        "worker_max_memory_per_child (Celery, KiB) is a backstop that recycles a pool process "
        f"after a task leaves it above the limit; with a flat {pool_end / mib:.0f} MiB here, "
        "a limit of a few times that only fires on a real leak",
    ]
    if context.plan.small:
        notes.append("small mode: far fewer images than the target's 5,000")
    context.record(
        Figure(
            "memory",
            round(ratio, 4),
            f"{growth:+.1f}% over {steady_images} images (first job {first_use:+.1f}%)",
            line,
            check=growth,
            details={
                "pool_rss_start_bytes": pool_start,
                "pool_rss_after_first_job_bytes": pool_first,
                "first_job_growth_percent": round(first_use, 2),
                "steady_state_images": steady_images,
                "pool_rss_end_bytes": pool_end,
                "pool_rss_peak_bytes": peak,
                "main_rss_start_bytes": main_start,
                "main_rss_end_bytes": main_end,
                "images": trace.images,
                "growth_percent": round(growth, 2),
                "main_growth_percent": round(main_growth, 2),
                "curve": [(images, pool) for images, pool, _ in trace.points],
                "plot_ratio": False,
                "notes": notes,
            },
        )
    )
