"""``micro_batching``: the pipeline job at the default batch size vs ``batch_size=1``; both
are run by the caller, interleaved with the pipeline's other variants."""

from __future__ import annotations

from bench.context import Context
from bench.figures import Figure
from bench.figures import verdict_text
from bench.stats import Samples
from bench.stats import paired_ratios
from bench.stats import speedup


def micro_batching_figure(context: Context, samples: dict[str, Samples]) -> None:
    default, one = samples["pipeline"], samples["batch1"]
    ratio = speedup(default, one)
    from face_emotions.settings import Settings

    chunk = Settings().chunk_batches
    line = (
        f"micro-batching: {ratio:.2f}x batch {context.batch_size} vs batch_size=1 "
        f"({verdict_text('micro_batching', ratio)})"
    )
    context.record(
        Figure(
            "micro_batching",
            round(ratio, 2),
            f"{ratio:.2f}x",
            line,
            details={
                "default": default.as_dict(),
                "batch_size_1": one.as_dict(),
                "paired_ratios": paired_ratios(default, one),
                "notes": [
                    f"the same {default.items}-image REST job with the default batch size "
                    f"({context.batch_size}) and with batch_size=1, interleaved",
                    f"with batch_size=1 a task holds EMOTIONS_CHUNK_BATCHES={chunk} one-image "
                    "forward passes, each written in its own transaction",
                ],
            },
        )
    )
