"""``python -m bench.run --images N --out bench/results``: every figure, one JSON/MD/PNG report.

This module is the entry point only: the arguments, the plan (:mod:`bench.context`), and the
orchestration, i.e. what is started when, what overlaps with what, and which figures are
interleaved with which. Each figure's measurement and report is its own module under
:mod:`bench.figures` (listed there); the services come from :mod:`bench.services`.

``--images`` below 200 selects the small mode (one repetition of each process-level figure,
fewer tiny jobs, memory over fewer images) that CI runs to prove the benchmark works.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import time
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from bench.context import SMALL_BELOW
from bench.context import Context
from bench.context import Plan
from bench.figures import FIGURES
from bench.figures import unavailable
from bench.figures.allocator import allocator_figure
from bench.figures.allocator import start_allocator
from bench.figures.backends import backends_figure
from bench.figures.backends import prepare_backends
from bench.figures.int8 import int8_figure
from bench.figures.limit import limit_only
from bench.figures.peers import peer_list
from bench.figures.peers import peers_figure
from bench.figures.tiny_jobs import dynamic_batching_supported
from bench.service_figures import MAIN_WORKER_FIGURES
from bench.service_figures import service_figures
from bench.service_figures import warm_up

if TYPE_CHECKING:
    from bench.assets import Workspace
    from bench.services import Cluster


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
    parser.add_argument("--peers", type=peer_list, default=[], help="ray,torchserve (bench extra)")
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

#: Photos of the detection figure in small mode (CI's proof that it runs).
PHOTOS_SMALL = 32


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
        photos = (
            assets.make_photos(workspace, PHOTOS_SMALL if args.small else args.images)
            if context.wants("detection")
            else []
        )
    with context.phase("bundle"):
        bundle_dir = assets.make_bundle(workspace, args.image_size)
    service_keys = ("pipeline", "detection", "micro_batching", "scale_out", "tiny_jobs", "memory")
    with contextlib.ExitStack() as stack:
        cluster = None
        if args.device == "cpu" and context.wants(*service_keys):
            try:
                with context.phase("start services"):
                    cluster = start_services(context, workspace, bundle_dir, stack)
            except Exception as exc:
                context.failed_all(service_keys, exc)
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
                context.failed_all(service_keys, exc)
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
        if context.wants("int8"):
            try:
                with context.phase("int8"):
                    int8_figure(context, bundle_dir, paths)
            except Exception as exc:
                context.failed("int8", exc)
        if cluster is not None:
            try:
                service_figures(context, cluster, workspace, bundle_dir, paths, photos)
            except Exception as exc:
                context.failed_all((*service_keys, "limit"), exc)
        elif context.wants("limit") and "limit" not in context.figures:
            try:
                with context.phase("limit"):
                    limit_only(context, bundle_dir, paths)
            except Exception as exc:
                context.failed("limit", exc)
    peers_figure(context, workspace, bundle_dir, paths)  # after the services stopped


def start_services(
    context: Context, workspace: Workspace, bundle_dir: Path, stack: contextlib.ExitStack
) -> Cluster:
    """Publish the champion, claim a Redis DB, start the API and the workers (no waiting)."""
    from bench import assets
    from bench import services
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
    # Passed by name: ``**{...}`` of a dict[str, str] could (for mypy) fill the int parameters.
    batch_size = str(context.batch_size)
    cluster.start_api()
    if context.wants(*MAIN_WORKER_FIGURES):
        cluster.start_worker("main", threads=context.threads, EMOTIONS_BATCH_SIZE=batch_size)
    if context.wants("scale_out"):
        cluster.start_worker("one", threads=1, EMOTIONS_BATCH_SIZE=batch_size)
        cluster.start_worker("two", threads=1, EMOTIONS_BATCH_SIZE=batch_size)
    if context.wants("tiny_jobs") and dynamic_batching_supported():
        cluster.start_worker(
            "dynamic",
            threads=context.threads,
            pool="threads",
            concurrency=8,
            EMOTIONS_DYNAMIC_BATCHING="true",
            EMOTIONS_BATCH_SIZE=batch_size,
        )
    return cluster


if __name__ == "__main__":
    sys.exit(main())
