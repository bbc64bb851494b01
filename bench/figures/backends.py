"""``backends``: torch eager (the worker's torch path) vs ONNX Runtime (OpenVINO and
torch.compile when available), on the same pre-decoded batches, with the largest probability
difference from the baseline: a faster backend only counts if it gives the same answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from bench.context import Context
from bench.figures import Figure
from bench.figures import verdict_text
from bench.stats import interleave
from bench.stats import speedup

if TYPE_CHECKING:
    from bench.inprocess import BackendSet

#: Reduced-precision forward passes are compared with fp32 against this, not 1e-4.
REDUCED_PRECISION_TOLERANCE = 2e-2


def prepare_backends(context: Context, bundle_dir: Path) -> BackendSet:
    from bench import inprocess
    from face_emotions.settings import Settings

    settings = Settings(device=context.args.device, torch_threads=context.threads)
    backends = inprocess.backend_set(
        bundle_dir,
        settings,
        threads=context.threads,
        try_compile=context.args.compile,
        extras=not context.plan.small,
    )
    if backends.baseline not in backends.runners:
        raise RuntimeError(f"baseline {backends.baseline} failed: {backends.missing}")
    return backends


def backends_figure(context: Context, backends: BackendSet, paths: list[Path]) -> None:
    import numpy as np

    from bench import assets
    from bench import inprocess

    gpu = context.args.device == "cuda"
    sizes = context.batch_sizes
    backends.smoke(assets.preprocessed(paths, context.args.image_size, min(sizes)))
    rows: list[dict[str, Any]] = []
    diffs: dict[str, float] = {}
    headline: tuple[str, float, int] | None = None
    # The question on CPU is torch eager vs ONNX Runtime; on GPU, which is fastest.
    preferred = None if gpu else backends.headline
    samples_by_batch: dict[int, dict[str, Any]] = {}
    for batch in sizes:
        count = max(context.plan.backend_images, batch * (4 if gpu else 1))
        images = assets.preprocessed(paths, context.args.image_size, count)
        arrays = [images[i : i + batch] for i in range(0, len(images), batch)]
        # One pass each: the warm-up (arenas, kernels, compilation) and the probabilities.
        probs = {n: inprocess.probabilities(r, arrays) for n, r in backends.runners.items()}
        reference = probs[backends.baseline]
        for name, values in probs.items():
            diffs[name] = max(diffs.get(name, 0.0), float(np.abs(values - reference).max()))
        loops = {name: inprocess.forward_loop(r, arrays) for name, r in backends.runners.items()}
        samples = interleave(loops, len(images), context.plan.inproc_reps)
        samples_by_batch[batch] = {n: v.as_dict() for n, v in samples.items()}
        base = samples[backends.baseline]
        for name, sample in samples.items():
            ratio = speedup(sample, base)
            rows.append(
                {
                    "batch": batch,
                    "backend": name,
                    "img/s": f"{sample.rate:.1f}",
                    f"vs {backends.baseline}": f"{ratio:.2f}x",
                    "max |Δp|": f"{diffs[name]:.1e}",
                }
            )
            context.gpu_curves.setdefault(name, []).append((batch, round(sample.rate, 1)))
            if name == backends.baseline or (preferred in samples and name != preferred):
                continue
            if headline is None or ratio > headline[1]:
                headline = (name, ratio, batch)
        if len(sizes) > 1:
            summary = ", ".join(f"{n} {s.rate:.0f}" for n, s in samples.items())
            print(f"  backends batch {batch}: {summary} img/s", flush=True)
    if not gpu:
        context.gpu_curves.clear()
    fp32 = [d for n, d in diffs.items() if n not in backends.reduced_precision]
    reduced = [d for n, d in diffs.items() if n in backends.reduced_precision]
    check = max(fp32) if len(fp32) > 1 else None
    missing = "; ".join(f"{n}: {why}" for n, why in backends.missing.items())
    if headline is None:
        raise RuntimeError(f"no backend beside {backends.baseline} could run: {missing}")
    name, ratio, batch = headline
    diff_text = f"max |Δp| {check:.1e}" if check is not None else "no other fp32 backend"
    line = f"backends: {name} {ratio:.2f}x {backends.baseline} (batch {batch}), {diff_text}"
    notes = [
        f"forward passes on the same pre-decoded batches ({context.args.image_size} px, "
        f"{context.threads} threads), interleaved, {context.plan.inproc_reps} repetitions",
        f"{backends.baseline} is the worker's torch path"
        + (" (channels-last, fp32)" if not gpu else " in fp32"),
        "max |Δp| = largest absolute difference of any class probability from the baseline; "
        "fp32 backends must stay below 1e-4",
    ]
    if reduced:
        within = max(reduced) < REDUCED_PRECISION_TOLERANCE
        notes.append(
            f"reduced precision (autocast) differs by up to {max(reduced):.1e}; its documented "
            f"tolerance is {REDUCED_PRECISION_TOLERANCE:.0e} ({'within' if within else 'OUTSIDE'})"
        )
        line += f", reduced precision max |Δp| {max(reduced):.1e} (tolerance 2e-2)"
    if missing:
        notes.append(f"not measured: {missing}")
    if check is not None:
        line += f" ({verdict_text('backends', check)})"
    context.record(
        Figure(
            "backends",
            round(ratio, 2),
            f"{name} {ratio:.2f}x {backends.baseline}; {diff_text}",
            line,
            check=check,
            details={
                "baseline": backends.baseline,
                "best": name,
                "max_abs_diff": diffs,
                "build_seconds": backends.build_seconds,
                "missing": backends.missing,
                "samples": samples_by_batch,
                "notes": notes,
                "table": rows,
            },
        )
    )
