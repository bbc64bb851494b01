"""``limit``: the best in-process decode -> preprocess -> forward loop with the worker's batch
size, threads, allocator fix, memory format and backend: what one worker could at best do.

The ratio is limit / forward-only (the share of the loop the model itself takes). The loops
are prepared here and interleaved by the caller with whatever they are compared to (the
pipeline job), or on their own (GPU runs, ``--only limit``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bench.context import Context
from bench.figures import Figure
from bench.stats import Samples
from bench.stats import interleave


@dataclass
class Limit:
    """The limit loop's variants for one batch size, ready to be interleaved with others."""

    variants: dict[str, Callable[[], None]]
    description: str
    batch_size: int
    images: int
    #: The predictor's ``backend`` (a ``Settings.backend`` value): what peers must serve with.
    backend: str = ""

    def figure(self, samples: dict[str, Samples], threads: int, device: str) -> Figure:
        best = max(("overlapped", "sequential"), key=lambda name: samples[name].rate)
        rate = samples[best].rate
        ratio = rate / samples["forward"].rate
        line = (
            f"limit: {rate:.1f} img/s (batch {self.batch_size}, {threads} threads, "
            f"{self.description}, {device}); {ratio:.2f} of forward-only"
        )
        return Figure(
            "limit",
            round(ratio, 2),
            f"{rate:.1f} img/s ({ratio:.2f} of forward-only)",
            line,
            details={
                "images_per_second": round(rate, 2),
                "best_loop": best,
                "batch_size": self.batch_size,
                "threads": threads,
                "backend": self.description,
                "backend_name": self.backend,
                "samples": {k: v.as_dict() for k, v in samples.items() if k in self.variants},
                "notes": [
                    f"decode -> resize -> normalise -> forward over the same {self.images} "
                    "files the pipeline job reads, in this process, after the worker's "
                    "allocator fix; best of the worker's overlapped loop (decode batch k+1 in "
                    f"threads while batch k runs) and a sequential loop: {best} won",
                    "ratio = limit / forward-only on pre-decoded batches: the share of the "
                    "loop spent in the model; above 1 means the loop with decoding beat "
                    "back-to-back forward passes, i.e. decoding is fully hidden (and the two "
                    "are equal within this machine's noise)",
                ],
                "table": [
                    {"loop": k, "img/s": f"{v.rate:.1f}", "reps": len(v.seconds)}
                    for k, v in samples.items()
                    if k in self.variants
                ],
            },
        )


def prepare_limit(
    context: Context, bundle_dir: Path, paths: list[Path], batch: int, backend: str | None = None
) -> Limit:
    """``backend``: what the pipeline's worker serves with (autotuned there); None tunes here,
    as a worker would (runs without services)."""
    from bench import inprocess
    from face_emotions.settings import Settings

    settings = Settings(device=context.args.device, torch_threads=context.threads, batch_size=batch)
    if backend:
        settings = settings.model_copy(update={"backend": backend})
    predictor = inprocess.worker_predictor(bundle_dir, settings)
    arrays = inprocess.decoded_batches(paths, context.args.image_size, batch)
    inprocess.warm(predictor, arrays)
    variants = inprocess.limit_variants(
        predictor, paths, arrays, batch_size=batch, decode_threads=settings.decode_threads
    )
    variants["overlapped"]()  # page cache, decode pool, every batch shape once
    return Limit(variants, inprocess.describe(predictor), batch, len(paths), predictor.backend)


def limit_only(context: Context, bundle_dir: Path, paths: list[Path]) -> None:
    """The limit without services (GPU runs, ``--only limit``), for each batch size asked."""
    measured: list[tuple[Limit, dict[str, Samples]]] = []
    for batch in context.batch_sizes:
        limit = prepare_limit(context, bundle_dir, paths, batch)
        samples = interleave(limit.variants, len(paths), max(context.plan.rounds, 3))
        measured.append((limit, samples))
        best = samples[limit_best(samples)].rate
        if len(context.batch_sizes) > 1:
            print(
                f"  limit batch {batch}: {best:.1f} img/s "
                f"(forward only {samples['forward'].rate:.1f})",
                flush=True,
            )
            context.gpu_curves.setdefault("limit (decode+forward)", []).append(
                (batch, round(best, 1))
            )
            context.gpu_curves.setdefault("forward only", []).append(
                (batch, round(samples["forward"].rate, 1))
            )
    limit, samples = max(measured, key=lambda item: item[1][limit_best(item[1])].rate)
    figure = limit.figure(samples, context.threads, context.args.device)
    if len(measured) > 1:
        figure.details["table"] = [
            {
                "batch": item.batch_size,
                "limit img/s": f"{s[limit_best(s)].rate:.1f}",
                "forward-only img/s": f"{s['forward'].rate:.1f}",
            }
            for item, s in measured
        ]
    context.record(figure)


def limit_best(samples: dict[str, Samples]) -> str:
    return max(("overlapped", "sequential"), key=lambda name: samples[name].rate)
