"""``python -m bench.run --images N --out bench/results``: every figure, one JSON/MD/PNG report.

Figures (each a ratio of two things measured side by side, interleaved, medians):

- ``limit``: the best in-process decode -> preprocess -> forward loop with the worker's batch
  size, threads, allocator fix, memory format and backend: what one worker could at best do
  (ratio: limit / forward-only, the share of the loop the model itself takes);
- ``pipeline``: the same images as one REST folder job on one worker, submit to finished,
  over ``limit``;
- ``micro_batching``: that job at the default batch size vs ``batch_size=1``;
- ``scale_out``: one vs two worker processes of one thread each;
- ``backends``: torch eager vs ONNX Runtime (OpenVINO, torch.compile when available), with the
  largest probability difference;
- ``allocator``: the worker's default CPU configuration vs naive eager torch (no malloc tuning,
  contiguous tensors), batch 32 at 224 px, in two processes;
- ``tiny_jobs``: many one-image jobs at once, dynamic batching vs without;
- ``memory``: the worker's resident memory growth over thousands of images after warm-up.

``--images`` below 200 selects the small mode (one repetition of each process-level figure,
fewer tiny jobs, memory over fewer images) that CI runs to prove the benchmark works.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.figures import FIGURES, LABELS, TARGETS, Figure, unavailable, verdict
from bench.services import die_with_parent
from bench.stats import Samples, interleave, paired_ratios, speedup

SMALL_BELOW = 200
FULL_TINY_JOBS = 200
SMALL_TINY_JOBS = 32
MEMORY_IMAGES = 5000
ALLOCATOR_SIZE = 224
ALLOCATOR_BATCH = 32
#: Reduced-precision forward passes are compared with fp32 against this, not 1e-4.
REDUCED_PRECISION_TOLERANCE = 2e-2


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description="Benchmark face-emotions and report ratios against the targets.",
    )
    parser.add_argument("--images", type=int, default=1000, help="images per job (default 1000)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    parser.add_argument(
        "--only",
        default=",".join(FIGURES),
        help=f"comma list of figures (default all): {','.join(FIGURES)}",
    )
    parser.add_argument("--image-size", type=int, default=224, choices=[112, 224])
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the worker's EMOTIONS_BATCH_SIZE"
    )
    parser.add_argument(
        "--batch-sizes",
        default=None,
        help="comma list for the in-process figures (limit, backends), e.g. 64,128,256,512",
    )
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument(
        "--threads", type=int, default=None, help="torch threads per worker (default: the worker's)"
    )
    parser.add_argument("--reps", type=int, default=None, help="override repetitions")
    parser.add_argument("--small", action="store_true", help=f"implied by --images < {SMALL_BELOW}")
    parser.add_argument("--compile", action="store_true", help="also try torch.compile on CPU")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs)")
    args = parser.parse_args(argv)
    args.only = [item.strip() for item in args.only.split(",") if item.strip()]
    unknown = sorted(set(args.only) - set(FIGURES))
    if unknown:
        parser.error(f"unknown figures {unknown}; choose from {','.join(FIGURES)}")
    if args.images < 8:
        parser.error("--images must be at least 8")
    args.small = args.small or args.images < SMALL_BELOW
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # SIGTERM (a CI timeout, kill) must still stop the services and give the Redis DB back.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    # The worker's allocator fix, before torch allocates anything: the in-process figures
    # must see what a worker sees (worker/app.py does the same at import).
    from face_emotions.ops.malloc_tuning import tune_glibc_malloc

    malloc_tuned = tune_glibc_malloc()

    import torch

    from bench import report
    from face_emotions.settings import Settings

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device found: run the CPU benchmark without --device cuda", file=sys.stderr)
        return 2
    defaults = Settings(device=args.device)
    threads = args.threads or defaults.torch_threads or torch.get_num_threads()
    torch.set_num_threads(threads)
    batch_size = args.batch_size or defaults.batch_size
    batch_sizes = (
        [int(b) for b in args.batch_sizes.split(",")] if args.batch_sizes else [batch_size]
    )
    context = Context(
        args, Plan.make(args.images, args.small, args.reps), threads, batch_size, batch_sizes
    )
    started = datetime.now(UTC)
    load_before = report.load_average()
    account = report.CpuAccount()
    clock = time.perf_counter()
    print(
        f"bench: {args.images} images at {args.image_size} px, batch "
        f"{','.join(map(str, batch_sizes)) if args.batch_sizes else batch_size}, "
        f"{threads} threads, {args.device}, {'small' if args.small else 'full'} mode",
        flush=True,
    )
    root = Path(tempfile.mkdtemp(prefix="face-emotions-bench-"))
    try:
        run_all(context, root)
    finally:
        if args.keep:
            print(f"bench: kept {root}", flush=True)
        else:
            import shutil

            shutil.rmtree(root, ignore_errors=True)
    load_after = report.load_average()
    cpu_share = account.others_share()
    for key in FIGURES:
        if key not in context.figures:
            context.figures[key] = unavailable(key, f"not run (--only {','.join(args.only)})")
    meta = {
        "command": report.command_line(),
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        "wall_seconds": round(time.perf_counter() - clock, 1),
        "mode": "small" if args.small else "full",
        "images": args.images,
        "image_size": args.image_size,
        "batch_size": batch_size,
        "batch_sizes": batch_sizes,
        "threads": threads,
        "device": args.device,
        "malloc_tuned_in_process": malloc_tuned,
        "plan": context.plan.__dict__,
        "phases_seconds": context.phases,
        "machine": report.machine(),
        "load_before": load_before,
        "load_after": load_after,
        "cpu_share": cpu_share,
        "load_note": report.load_note(load_before, cpu_share),
    }
    document = {
        "meta": meta,
        "figures": {key: context.figures[key].as_dict() for key in FIGURES},
        "analysis": context.analysis,
        "errors": context.errors,
        "gpu_curves": context.gpu_curves or None,
    }
    paths = report.write_outputs(args.out, document, context.figures)
    print(f"bench: wrote {paths['json']}, {paths['md']}, {paths['png']}", flush=True)
    return 1 if context.errors else 0


# -- orchestration -------------------------------------------------------------------------


def run_all(context: Context, root: Path) -> None:
    """Set-up that can overlap runs while the services boot; measurements run one at a time.

    Worker start-up (imports, then the first model load) is the longest fixed cost, so the
    services are started first and the allocator children and backends are prepared while
    they boot. Nothing is timed until every process is ready and warm.
    """
    from bench import assets

    args = context.args
    workspace = assets.Workspace(root, args.images, args.image_size)
    tiny = context.plan.tiny_jobs if context.wants("tiny_jobs") else 0
    with context.phase("faces"):
        paths = assets.make_faces(workspace, tiny)
    with context.phase("bundle"):
        bundle_dir = assets.make_bundle(workspace, args.image_size)
    service_keys = ("pipeline", "micro_batching", "scale_out", "tiny_jobs", "memory")
    with contextlib.ExitStack() as stack:
        cluster = None
        if args.device == "cpu" and context.wants(*service_keys):
            try:
                with context.phase("start services"):
                    cluster = start_services(context, workspace, bundle_dir, stack)
            except Exception as exc:
                fail_all(context, service_keys, exc)
        elif args.device == "cuda":
            for key in service_keys:
                if context.wants(key):
                    context.record(unavailable(key, "GPU runs measure limit and backends only"))
        children = None
        if context.wants("allocator"):
            try:
                with context.phase("start allocator processes"):
                    children = start_allocator(context, workspace, paths)
                stack.callback(children.close)
            except Exception as exc:
                context.failed("allocator", exc)
        backends = None
        if context.wants("backends"):
            try:
                with context.phase("build backends"):
                    backends = prepare_backends(context, bundle_dir)
            except Exception as exc:
                context.failed("backends", exc)
        if cluster is not None:
            try:
                with context.phase("services ready and warm"):
                    cluster.wait_ready()
                    warm_up(cluster)
            except Exception as exc:
                fail_all(context, service_keys, exc)
                cluster = None
        if children is not None:
            try:
                with context.phase("allocator"):
                    allocator_figure(context, children)
            except Exception as exc:
                context.failed("allocator", exc)
            children.close()
        if backends is not None:
            try:
                with context.phase("backends"):
                    backends_figure(context, backends, paths)
            except Exception as exc:
                context.failed("backends", exc)
            del backends
        if cluster is not None:
            try:
                service_figures(context, cluster, workspace, bundle_dir, paths)
            except Exception as exc:
                fail_all(context, (*service_keys, "limit"), exc)
        elif context.wants("limit") and "limit" not in context.figures:
            try:
                with context.phase("limit"):
                    limit_only(context, bundle_dir, paths)
            except Exception as exc:
                context.failed("limit", exc)


def fail_all(context: Context, keys: tuple[str, ...], exc: BaseException) -> None:
    for key in keys:
        if context.wants(key) and key not in context.figures:
            context.failed(key, exc)


# -- limit ---------------------------------------------------------------------------------


@dataclass
class Limit:
    """The limit loop's variants for one batch size, ready to be interleaved with others."""

    variants: dict[str, Callable[[], None]]
    description: str
    batch_size: int
    images: int

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


def prepare_limit(context: Context, bundle_dir: Path, paths: list[Path], batch: int) -> Limit:
    from bench import inprocess
    from face_emotions.settings import Settings

    settings = Settings(device=context.args.device, torch_threads=context.threads, batch_size=batch)
    predictor = inprocess.worker_predictor(bundle_dir, settings)
    arrays = inprocess.decoded_batches(paths, context.args.image_size, batch)
    inprocess.warm(predictor, arrays)
    variants = inprocess.limit_variants(
        predictor, paths, arrays, batch_size=batch, decode_threads=settings.decode_threads
    )
    variants["overlapped"]()  # page cache, decode pool, every batch shape once
    return Limit(variants, inprocess.describe(predictor), batch, len(paths))


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


# -- backends ------------------------------------------------------------------------------


def prepare_backends(context: Context, bundle_dir: Path) -> Any:
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


def backends_figure(context: Context, backends: Any, paths: list[Path]) -> None:
    import numpy as np

    from bench import assets, inprocess

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


# -- allocator -----------------------------------------------------------------------------


class AllocatorChild:
    """One ``bench.alloc_child`` process; :meth:`run` times one loop inside it."""

    def __init__(self, mode: str, args: list[str], log: Path, env: dict[str, str]) -> None:
        self.mode = mode
        self._log = log.open("ab")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "bench.alloc_child", "--mode", mode, *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=env,
            cwd=Path(__file__).resolve().parents[1],
            preexec_fn=die_with_parent if sys.platform == "linux" else None,
        )
        self._hello: dict[str, Any] | None = None
        self.faults: list[int] = []

    @property
    def hello(self) -> dict[str, Any]:
        """The child's first line, once its models are built (read lazily: it loads while
        the services boot)."""
        if self._hello is None:
            self._hello = self._read()
        return self._hello

    def _read(self) -> dict[str, Any]:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            with contextlib.suppress(json.JSONDecodeError):
                message = json.loads(line)
                if isinstance(message, dict):
                    return message
        raise RuntimeError(f"allocator child {self.mode} exited ({self.popen.wait()})")

    def run(self, variant: str) -> float:
        self.hello  # noqa: B018 - wait until the child is ready
        assert self.popen.stdin is not None
        self.popen.stdin.write(variant + "\n")
        self.popen.stdin.flush()
        message = self._read()
        self.faults.append(int(message["faults"]))
        return float(message["seconds"])

    def close(self) -> None:
        with contextlib.suppress(Exception):
            assert self.popen.stdin is not None
            self.popen.stdin.write("quit\n")
            self.popen.stdin.flush()
        try:
            self.popen.wait(20)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
        self._log.close()


@dataclass
class AllocatorChildren:
    naive: AllocatorChild
    tuned: AllocatorChild
    images: int

    def close(self) -> None:
        self.naive.close()
        self.tuned.close()


def start_allocator(context: Context, workspace: Any, paths: list[Path]) -> AllocatorChildren:
    """Start both processes (they load their models while the services boot)."""
    import numpy as np

    from bench import assets
    from face_emotions.settings import Settings

    bundle_dir = assets.make_bundle(workspace, ALLOCATOR_SIZE)
    images = assets.preprocessed(paths, ALLOCATOR_SIZE, context.plan.allocator_images)
    arrays_path = workspace.root / "allocator-arrays.npy"
    np.save(arrays_path, images)
    common = [
        "--bundle",
        str(bundle_dir),
        "--arrays",
        str(arrays_path),
        "--batch-size",
        str(ALLOCATOR_BATCH),
        "--threads",
        str(context.threads),
        "--backend",
        Settings().backend,
    ]
    clean = {
        k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "LD_PRELOAD"
    }
    naive = AllocatorChild(
        "naive",
        common,
        workspace.logs / "alloc-naive.log",
        {**clean, "EMOTIONS_MALLOC_TUNING": "0"},
    )
    try:
        tuned = AllocatorChild(
            "tuned",
            common,
            workspace.logs / "alloc-tuned.log",
            {**clean, "EMOTIONS_MALLOC_TUNING": "1"},
        )
    except BaseException:
        naive.close()
        raise
    return AllocatorChildren(naive, tuned, len(images))


def allocator_figure(context: Context, children: AllocatorChildren) -> None:
    naive, tuned = children.naive, children.tuned
    images = children.images
    samples = interleave(
        {
            "naive eager": lambda: naive.run("eager"),
            "tuned eager": lambda: tuned.run("eager"),
            "worker default": lambda: tuned.run("worker"),
        },
        images,
        context.plan.allocator_reps,
    )
    worker, eager, naive_s = (
        samples["worker default"],
        samples["tuned eager"],
        samples["naive eager"],
    )
    ratio = speedup(worker, naive_s)
    alloc_only = speedup(eager, naive_s)
    chosen = tuned.hello.get("backend")
    reps = context.plan.allocator_reps
    naive_faults = sum(naive.faults) / max(len(naive.faults), 1) / images
    tuned_faults = sum(tuned.faults) / max(len(tuned.faults), 1) / images
    line = (
        f"worker default CPU config vs naive eager: {ratio:.2f}x (batch {ALLOCATOR_BATCH}, "
        f"{ALLOCATOR_SIZE} px, {chosen}; allocator alone {alloc_only:.2f}x) "
        f"({verdict_text('allocator', ratio)})"
    )
    context.record(
        Figure(
            "allocator",
            round(ratio, 2),
            f"{ratio:.2f}x (allocator alone {alloc_only:.2f}x)",
            line,
            details={
                "allocator_only": round(alloc_only, 3),
                "worker_backend": chosen,
                "mallopt_applied": tuned.hello.get("tuned"),
                "page_faults_per_image": {
                    "naive": round(naive_faults, 1),
                    "tuned (both variants)": round(tuned_faults, 1),
                },
                "paired_ratios": paired_ratios(worker, naive_s),
                "samples": {k: v.as_dict() for k, v in samples.items()},
                "notes": [
                    f"two processes, {images} images per loop, {reps} interleaved "
                    f"repetitions, {context.threads} torch threads each",
                    "naive: EMOTIONS_MALLOC_TUNING=0 and no MALLOC_* variables (glibc "
                    "returns every block over 32 MB to the kernel), torch eager, contiguous "
                    "NCHW",
                    "worker default: tune_glibc_malloc() before torch loads (as worker/app.py "
                    f"does), channels-last, the worker's backend choice ({chosen})",
                    "allocator alone: the naive model (eager, NCHW) in the tuned process",
                    f"minor page faults per image: naive {naive_faults:.0f}, tuned "
                    f"{tuned_faults:.0f}",
                ],
                "table": [
                    {
                        "process / loop": k,
                        "img/s": f"{v.rate:.1f}",
                        "vs naive": f"{speedup(v, naive_s):.2f}x",
                    }
                    for k, v in samples.items()
                ],
            },
        )
    )


def verdict_text(key: str, value: float) -> str:
    """Ratios are judged as printed (2 decimals), so "1.80x: no" cannot happen; differences
    and growths (``below`` targets) are judged unrounded."""
    target = TARGETS.get(key)
    if target is not None and target.kind == "at_least":
        value = round(value, 2)
    return verdict(Figure(key, value, "", "", check=value))


# -- services ------------------------------------------------------------------------------


@dataclass
class MemoryTrace:
    """RSS of the pipeline worker's processes after warm-up and after every job it ran since.

    ``points`` are (images classified since warm-up, pool process RSS, main process RSS).
    """

    process: Any
    images: int = 0
    points: list[tuple[int, int, int]] = field(default_factory=list)

    def sample(self, images: int = 0) -> None:
        main, pool = self.process.rss()
        self.images += images
        self.points.append((self.images, pool, main))


def dynamic_batching_supported() -> bool:
    """The worker's contract: a ``dynamic_batching`` setting (EMOTIONS_DYNAMIC_BATCHING)."""
    from face_emotions.settings import Settings

    return "dynamic_batching" in Settings.model_fields


def start_services(
    context: Context, workspace: Any, bundle_dir: Path, stack: contextlib.ExitStack
) -> Any:
    """Publish the champion, claim a Redis DB, start the API and the workers (no waiting)."""
    from bench import assets, services
    from face_emotions.jobs.migrate import upgrade

    assets.publish_champion(workspace, bundle_dir)
    upgrade(workspace.database_url)
    broker_url, db = services.claim_redis_db()
    stack.callback(services.release_redis_db, db)
    environment = services.Environment(
        var_dir=workspace.var_dir,
        data_root=workspace.data_root,
        database_url=workspace.database_url,
        broker_url=broker_url,
        tracking_uri=workspace.tracking_uri,
        device=context.args.device,
        logs=workspace.logs,
    )
    cluster = stack.enter_context(services.running(environment))
    batch_env = {"EMOTIONS_BATCH_SIZE": str(context.batch_size)}
    cluster.start_api()
    if context.wants(*MAIN_WORKER_FIGURES):
        cluster.start_worker("main", threads=context.threads, **batch_env)
    if context.wants("scale_out"):
        cluster.start_worker("one", threads=1, **batch_env)
        cluster.start_worker("two", threads=1, **batch_env)
    if context.wants("tiny_jobs") and dynamic_batching_supported():
        cluster.start_worker(
            "dynamic",
            threads=context.threads,
            pool="threads",
            concurrency=8,
            EMOTIONS_DYNAMIC_BATCHING="true",
            **batch_env,
        )
    return cluster


MAIN_WORKER_FIGURES = ("limit", "pipeline", "micro_batching", "memory", "tiny_jobs")


def warm_up(cluster: Any) -> None:
    """Every worker loads the model and sizes its arenas before anything is timed.

    One warm-up job per worker, submitted at once while all consume: an idle worker reserves
    one task at a time, so each normally gets one and the model loads overlap. A worker that
    got none (Celery's remote ``stats`` says how many tasks each ran) is warmed on its own.
    """
    from bench import assets

    names = list(cluster.workers)
    cluster.consume(names)
    with ThreadPoolExecutor(len(names)) as pool:
        list(pool.map(lambda _name: cluster.run_job(assets.WARMUP), names))
    for name in names:
        if cluster.tasks_done(name) == 0:
            cluster.consume([name])
            cluster.run_job(assets.WARMUP)
    if "main" in cluster.workers:
        cluster.consume(["main"])
        cluster.run_job(assets.WARMUP)
        cluster.run_job(assets.WARMUP_ONE, batch_size=1)


def service_figures(
    context: Context, cluster: Any, workspace: Any, bundle_dir: Path, paths: list[Path]
) -> None:
    dynamic = "dynamic" in cluster.workers
    if "main" in cluster.workers:
        main_worker_figures(context, cluster, workspace, bundle_dir, paths, dynamic)
    if context.wants("scale_out"):
        try:
            with context.phase("scale-out"):
                scale_out_figure(context, cluster)
        except Exception as exc:
            context.failed("scale_out", exc)


def main_worker_figures(
    context: Context,
    cluster: Any,
    workspace: Any,
    bundle_dir: Path,
    paths: list[Path],
    dynamic: bool,
) -> None:
    """limit, pipeline and micro-batching interleaved; then tiny jobs; memory throughout."""
    from bench import assets

    plan = context.plan
    cluster.consume(["main"])
    worker = cluster.workers["main"]
    trace = MemoryTrace(worker.process)
    trace.sample()
    runs: dict[str, list[Any]] = {"pipeline": [], "batch1": []}

    def job(name: str, batch_size: int | None) -> Callable[[], float]:
        def run() -> float:
            result = cluster.run_job(assets.FACES, batch_size=batch_size)
            runs[name].append(result)
            trace.sample(result.images)
            return result.seconds

        return run

    limit: Limit | None = None
    variants: dict[str, Callable[[], float | None]] = {}
    if context.wants("limit", "pipeline"):
        limit = prepare_limit(context, bundle_dir, paths, context.batch_size)
        variants.update(limit.variants)
    if context.wants("pipeline"):
        chunk = chunk_loop(context, workspace, paths)
        if chunk is not None:
            variants["chunk"] = chunk
    if context.wants("pipeline", "micro_batching", "memory"):
        variants["pipeline"] = job("pipeline", None)
    if context.wants("micro_batching"):
        variants["batch1"] = job("batch1", 1)
    with context.phase("limit, pipeline, micro-batching"):
        samples = interleave(variants, len(paths), plan.rounds) if variants else {}

    if limit is not None:
        context.record(limit.figure(samples, context.threads, context.args.device))
    if "pipeline" in samples and limit is not None and context.wants("pipeline"):
        poll = cluster.poll_seconds(runs["pipeline"][-1].job_id)
        pipeline_figure(context, samples, runs["pipeline"], poll)
    if "batch1" in samples:
        micro_batching_figure(context, samples)
    if context.wants("tiny_jobs"):
        try:
            with context.phase("tiny jobs"):
                tiny_jobs_figure(context, cluster, dynamic, trace)
        except Exception as exc:
            context.failed("tiny_jobs", exc)
    if context.wants("memory"):
        target = 0 if plan.small else MEMORY_IMAGES
        cluster.consume(["main"])
        with context.phase("memory top-up"):
            while trace.images < target:
                result = cluster.run_job(assets.FACES)
                trace.sample(result.images)
        memory_figure(context, trace)


def chunk_loop(context: Context, workspace: Any, paths: list[Path]) -> Any:
    """The worker's chunk code in this process, or None (noted) if it cannot be set up."""
    from bench import inprocess
    from face_emotions.settings import Settings

    try:
        settings = Settings(
            var_dir=workspace.var_dir,
            mlflow_tracking_uri=workspace.tracking_uri,
            database_url=f"sqlite:///{workspace.root / 'in-process.db'}",
            data_root=str(workspace.data_root),
            device=context.args.device,
            torch_threads=context.threads,
            batch_size=context.batch_size,
        )
        loop = inprocess.ChunkLoop(settings, paths, context.batch_size)
        loop.warm()
        return loop
    except Exception as exc:
        context.analysis.append(f"the in-process chunk loop could not run: {exc}")
        return None


def pipeline_figure(
    context: Context, samples: dict[str, Samples], runs: list[Any], poll_seconds: float
) -> None:
    """pipeline / limit, and a decomposition of what the pipeline loses.

    Three steps from the pure loop to the user's job: the limit loop; the worker's own chunk
    code in this process (adds SQLite writes, cancellation checks, heartbeats); the job through
    the API and a Celery worker (adds the broker, a second process tree, the API answering the
    client's polls). Each is a ratio to the limit measured in the same interleaved rounds.
    """
    best = limit_best(samples)
    pipeline, limit = samples["pipeline"], samples[best]
    ratio = speedup(pipeline, limit)
    breakdowns = [run.breakdown() for run in runs]
    queued = sorted(b.get("queued_seconds", 0.0) for b in breakdowns)
    running = sorted(b.get("running_seconds", 0.0) for b in breakdowns)
    median_queued, median_running = queued[len(queued) // 2], running[len(running) // 2]
    line = (
        f"pipeline/limit: {ratio:.2f} ({pipeline.rate:.1f} vs {limit.rate:.1f} img/s) "
        f"({verdict_text('pipeline', ratio)})"
    )
    decomposition = [
        {"step": f"limit loop ({best})", "img/s": f"{limit.rate:.1f}", "of limit": "1.00"}
    ]
    chunk = samples.get("chunk")
    if chunk is not None:
        decomposition.append(
            {
                "step": "worker chunk code in-process (SQLite writes, no Celery/API)",
                "img/s": f"{chunk.rate:.1f}",
                "of limit": f"{speedup(chunk, limit):.2f}",
            }
        )
    if median_running:
        worker_rate = pipeline.items / median_running
        decomposition.append(
            {
                "step": "Celery worker, job started -> finished (API timestamps)",
                "img/s": f"{worker_rate:.1f}",
                "of limit": f"{worker_rate / limit.rate:.2f}",
            }
        )
    decomposition.append(
        {
            "step": "REST job, POST -> seen finished",
            "img/s": f"{pipeline.rate:.1f}",
            "of limit": f"{ratio:.2f}",
        }
    )
    from bench.services import POLL_INTERVAL

    poll_share = poll_seconds / POLL_INTERVAL
    tail = pipeline.median - median_queued - median_running
    context.analysis += [
        f"pipeline job ({pipeline.items} images), medians: {pipeline.median:.2f} s from POST to "
        f"seen finished = {median_queued:.2f} s queued + {median_running:.2f} s running + "
        f"{tail:.2f} s for the POST itself and the last poll; the limit loop took "
        f"{limit.median:.2f} s for the same files",
        f"one status poll (GET /api/v1/jobs/<id>) costs {poll_seconds * 1000:.1f} ms in the "
        f"API (median of 30): polling every {POLL_INTERVAL} s keeps about {poll_share:.0%} of "
        f"one core busy, on a machine with {os.cpu_count()} cores that the worker's "
        f"{context.threads} threads also need",
    ]
    if chunk is not None and median_running:
        context.analysis.append(
            _loss_story(speedup(chunk, limit), pipeline.items / median_running / limit.rate)
        )
    context.record(
        Figure(
            "pipeline",
            round(ratio, 2),
            f"{ratio:.2f} ({pipeline.rate:.1f} / {limit.rate:.1f} img/s)",
            line,
            details={
                "pipeline": pipeline.as_dict(),
                "limit_loop": best,
                "limit": limit.as_dict(),
                "chunk_in_process": chunk.as_dict() if chunk is not None else None,
                "paired_ratios": paired_ratios(pipeline, limit),
                "poll_seconds": round(poll_seconds, 4),
                "jobs": breakdowns,
                "notes": [
                    f"one REST folder job of {pipeline.items} images at the default batch size "
                    "on one worker (prefork, concurrency 1, "
                    f"{context.threads} torch threads), timed from POST to the first poll "
                    f"(every {POLL_INTERVAL} s) that sees it succeeded",
                    "limit, in-process chunk and pipeline repetitions alternate, so all saw the "
                    "same load",
                ],
                "table": decomposition,
            },
        )
    )


def _loss_story(chunk: float, worker: float) -> str:
    """Name where pipeline/limit is lost, from the in-process chunk and the worker's ratios."""
    parts = [
        f"the worker's chunk code ran at {chunk:.2f} of the limit in this process and at "
        f"{worker:.2f} inside the Celery worker"
    ]
    if chunk < 0.95:
        parts.append(
            f"the chunk code itself (a transaction per micro-batch, cancellation checks, "
            f"heartbeats, the decode pool) costs about {1 - chunk:.0%}"
        )
    if worker < chunk - 0.03:
        parts.append(
            f"the processes around it (Celery, the API answering polls, Redis) about "
            f"{chunk - worker:.0%} more"
        )
    if len(parts) == 1:
        parts.append("neither costs more than this machine's noise")
    return "; ".join(parts)


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


def scale_out_figure(context: Context, cluster: Any) -> None:
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


def tiny_jobs_figure(context: Context, cluster: Any, dynamic: bool, trace: MemoryTrace) -> None:
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
    ratio = speedup(with_dynamic, default)
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
        f"many tiny jobs: {ratio:.2f}x with dynamic batching ({count} one-image jobs) "
        f"({verdict_text('tiny_jobs', ratio)})"
    )
    context.record(
        Figure(
            "tiny_jobs",
            round(ratio, 2),
            f"{ratio:.2f}x ({count} jobs)",
            line,
            details={
                "default": default.as_dict(),
                "dynamic": with_dynamic.as_dict(),
                "paired_ratios": paired_ratios(with_dynamic, default),
                "submit_seconds": submit_seconds,
                "notes": notes,
            },
        )
    )


def memory_figure(context: Context, trace: MemoryTrace) -> None:
    if len(trace.points) < 2:
        context.record(unavailable("memory", "the worker ran no job after warm-up"))
        return
    _, pool_start, main_start = trace.points[0]
    _, pool_end, main_end = trace.points[-1]
    if not pool_start:
        raise RuntimeError("the worker has no pool process to measure")
    ratio = pool_end / pool_start
    growth = (ratio - 1.0) * 100.0
    main_growth = (main_end / main_start - 1.0) * 100.0 if main_start else 0.0
    peak = max(pool for _, pool, _ in trace.points)
    mib = 2**20
    line = (
        f"worker memory growth: {growth:+.1f}% over {trace.images} images "
        f"(pool process {pool_start / mib:.0f} -> {pool_end / mib:.0f} MiB RSS, peak "
        f"{peak / mib:.0f}; main process {main_growth:+.1f}%) ({verdict_text('memory', growth)})"
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
            f"{growth:+.1f}% over {trace.images} images",
            line,
            check=growth,
            details={
                "pool_rss_start_bytes": pool_start,
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


if __name__ == "__main__":
    sys.exit(main())
