"""``scale_out``: one vs two worker processes of one thread each on the same job, the second
worker's queue consumer switched on and off between runs so the two interleave."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from bench.context import Context
from bench.figures import Figure
from bench.figures import verdict_text
from bench.stats import interleave
from bench.stats import paired_ratios
from bench.stats import speedup

if TYPE_CHECKING:
    from bench.services import Cluster


def scale_out_figure(context: Context, cluster: Cluster) -> None:
    from bench import assets
    from face_emotions.settings import Settings

    images = context.args.images
    chunk_batches = Settings().chunk_batches
    batch = context.batch_size
    if images < batch * chunk_batches * 4:  # fewer than 4 chunks: nothing to spread
        batch = max(1, images // (chunk_batches * 4))

    def run(names: list[str]) -> Callable[[], float]:
        def go() -> float:
            cluster.consume(names)
            return float(cluster.run_job(assets.FACES, batch_size=batch).seconds)

        return go

    samples = interleave(
        {"one worker": run(["one"]), "two workers": run(["one", "two"])},
        images,
        context.plan.rounds,
    )
    one, two = samples["one worker"], samples["two workers"]
    ratio = speedup(two, one)
    chunks = -(-images // (batch * chunk_batches))
    line = (
        f"scale-out: {ratio:.2f}x two workers vs one (1 thread each, batch {batch}, "
        f"{chunks} chunks) ({verdict_text('scale_out', ratio)})"
    )
    cores = os.cpu_count() or 1
    context.record(
        Figure(
            "scale_out",
            round(ratio, 2),
            f"{ratio:.2f}x",
            line,
            details={
                "one": one.as_dict(),
                "two": two.as_dict(),
                "batch_size": batch,
                "chunks": chunks,
                "paired_ratios": paired_ratios(two, one),
                "notes": [
                    f"the same {images}-image REST job; worker processes with "
                    "EMOTIONS_TORCH_THREADS=1 each; the second worker's queue consumer is "
                    "switched on and off between runs (Celery add/cancel_consumer)",
                    f"batch {batch} so the job has {chunks} chunks of "
                    f"{batch * chunk_batches} images to spread",
                    f"{cores} cores are shared with the API, Redis, SQLite and this process",
                ],
            },
        )
    )
