"""``tiny_jobs``: many one-image jobs submitted at once, served by a threads-pool worker with
dynamic batching (forward passes shared between jobs), as images/s against the limit (what one
worker can do with full micro-batches); the default worker's rate is reported beside it."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.context import Context
from bench.figures import Figure
from bench.figures import unavailable
from bench.figures import verdict_text
from bench.stats import interleave
from bench.stats import paired_ratios
from bench.stats import speedup

if TYPE_CHECKING:
    from bench.figures.memory import MemoryTrace
    from bench.services import Cluster


def dynamic_batching_supported() -> bool:
    """The worker's contract: a ``dynamic_batching`` setting (EMOTIONS_DYNAMIC_BATCHING)."""
    from face_emotions.settings import Settings

    return "dynamic_batching" in Settings.model_fields


def tiny_jobs_figure(context: Context, cluster: Cluster, dynamic: bool, trace: MemoryTrace) -> None:
    from bench import assets

    count = context.plan.tiny_jobs
    folders = [f"{assets.TINY}/{i:04d}" for i in range(count)]
    submit_seconds: dict[str, list[float]] = {}

    def arm(worker_name: str) -> Callable[[], float]:
        def go() -> float:
            cluster.consume([worker_name])
            seconds, _jobs = cluster.run_many(folders)
            submit_seconds.setdefault(worker_name, []).append(round(cluster.last_submit_seconds, 3))
            if worker_name == "main":
                trace.sample(count)
            return seconds

        return go

    variants = {"default": arm("main")}
    if dynamic:
        variants["dynamic"] = arm("dynamic")
    samples = interleave(variants, count, context.plan.tiny_rounds)
    default = samples["default"]
    notes = [
        f"{count} one-image folder jobs submitted at once from 16 client threads; time from "
        "the first POST until the last job is finished (one list request per 0.2 s poll)",
        "without: the default worker (prefork, concurrency 1); with: "
        "--pool threads --concurrency 8 and EMOTIONS_DYNAMIC_BATCHING=true",
    ]
    if not dynamic:
        reason = (
            "the worker does not support dynamic batching yet (no 'dynamic_batching' in "
            f"Settings); without it: {default.rate:.1f} jobs/s"
        )
        figure = unavailable("tiny_jobs", reason, default=default.as_dict(), notes=notes)
        context.record(figure)
        return
    with_dynamic = samples["dynamic"]
    versus_default = speedup(with_dynamic, default)
    limit = context.figures.get("limit")
    limit_rate = (limit.details or {}).get("images_per_second") if limit else None
    if not limit_rate:
        reason = (
            f"no limit measured to compare with; {with_dynamic.rate:.1f} img/s with dynamic "
            f"batching, {versus_default:.2f}x the default worker"
        )
        context.record(unavailable("tiny_jobs", reason, notes=notes))
        return
    ratio = with_dynamic.rate / limit_rate
    submitting = statistics.median(
        seconds for series in submit_seconds.values() for seconds in series
    )
    context.analysis.append(
        f"many tiny jobs: submitting the {count} jobs alone takes {submitting:.2f} s (median, "
        f"API on the same cores); the rest is per-job work that no batching shares (a task "
        f"message, two transactions, a status poll): {default.median:.2f} s without dynamic "
        f"batching vs {with_dynamic.median:.2f} s with it. Sharing forward passes removes only "
        f"the model's share, so the ratio is bounded by how much of a one-image job the "
        f"forward pass is on this machine"
    )
    line = (
        f"many tiny jobs: {with_dynamic.rate:.1f} img/s with dynamic batching, {ratio:.2f} of "
        f"the limit ({limit_rate:.1f} img/s; {versus_default:.2f}x the default worker, "
        f"{count} one-image jobs) ({verdict_text('tiny_jobs', ratio)})"
    )
    context.record(
        Figure(
            "tiny_jobs",
            round(ratio, 2),
            f"{ratio:.2f} of the limit ({count} jobs)",
            line,
            details={
                "default": default.as_dict(),
                "dynamic": with_dynamic.as_dict(),
                "limit_images_per_second": limit_rate,
                "dynamic_vs_default": round(versus_default, 2),
                "paired_ratios": paired_ratios(with_dynamic, default),
                "submit_seconds": submit_seconds,
                "notes": notes,
            },
        )
    )
