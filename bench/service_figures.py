"""The figures measured on the running services: the main worker's (limit, pipeline,
micro-batching, tiny jobs, memory, then detection) and scale-out's two workers.

:mod:`bench.run` starts the services and calls :func:`service_figures` once they are warm; this
module decides what runs interleaved with what on them.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING

from bench.context import Context
from bench.cpu_use import measure_cpu
from bench.cpu_use import process_tree
from bench.cpu_use import this_process
from bench.figures.detection import detection_figure
from bench.figures.limit import Limit
from bench.figures.limit import prepare_limit
from bench.figures.memory import MEMORY_IMAGES
from bench.figures.memory import MemoryTrace
from bench.figures.memory import memory_figure
from bench.figures.micro_batching import micro_batching_figure
from bench.figures.pipeline import chunk_loop
from bench.figures.pipeline import pipeline_figure
from bench.figures.scale_out import scale_out_figure
from bench.figures.tiny_jobs import tiny_jobs_figure
from bench.stats import interleave

if TYPE_CHECKING:
    from bench.assets import Workspace
    from bench.cpu_use import CpuUse
    from bench.services import Cluster
    from bench.services import JobRun


MAIN_WORKER_FIGURES = ("limit", "pipeline", "detection", "micro_batching", "memory", "tiny_jobs")


def warm_up(cluster: Cluster) -> None:
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
    context: Context,
    cluster: Cluster,
    workspace: Workspace,
    bundle_dir: Path,
    paths: list[Path],
    photos: list[Path],
) -> None:
    """The figures of the main worker, then scale-out (its own two workers)."""
    if "main" in cluster.workers:
        main_worker_figures(context, cluster, workspace, bundle_dir, paths)
        if context.wants("detection"):
            # After memory: loading the detector must not count as the worker's growth.
            try:
                with context.phase("detection"):
                    detection_figure(context, cluster, bundle_dir, photos)
            except Exception as exc:
                context.failed("detection", exc)
    if context.wants("scale_out"):
        try:
            with context.phase("scale-out"):
                scale_out_figure(context, cluster)
        except Exception as exc:
            context.failed("scale_out", exc)


def main_worker_figures(
    context: Context, cluster: Cluster, workspace: Workspace, bundle_dir: Path, paths: list[Path]
) -> None:
    """limit, pipeline and micro-batching interleaved; then tiny jobs; memory throughout."""
    from bench import assets

    plan = context.plan
    cluster.consume(["main"])
    worker = cluster.workers["main"]
    trace = MemoryTrace(worker)
    trace.sample()
    runs: dict[str, list[JobRun]] = {"pipeline": [], "batch1": []}
    chunk_cpu: list[CpuUse] = []

    cpu_parts = {
        "worker pool": lambda: process_tree(worker.process.pid, children_only=True),
        "worker main": lambda: [worker.process.pid],
        "API": lambda: process_tree(cluster.api.pid) if cluster.api else [],
        "benchmark": this_process,
    }

    def job(name: str, batch_size: int | None) -> Callable[[], float]:
        def run() -> float:
            with measure_cpu(cpu_parts) as use:
                result = cluster.run_job(assets.FACES, batch_size=batch_size)
            result.cpu = use
            runs[name].append(result)
            trace.sample(result.images)
            return result.seconds

        return run

    limit: Limit | None = None
    variants: dict[str, Callable[[], float | None]] = {}
    if context.wants("limit", "pipeline"):
        # The worker autotuned its backend at load: the limit must run the same one, not tune
        # again (on a noisy machine two tunings can choose differently).
        from bench.services import serving_backend

        backend = serving_backend(worker, cluster.client().models()["workers"])
        if backend is None:
            context.analysis.append(
                "limit: the pipeline worker reported no backend; the limit tuned its own"
            )
        limit = prepare_limit(context, bundle_dir, paths, context.batch_size, backend)
        variants.update(limit.variants)
    if context.wants("pipeline"):
        chunk = chunk_loop(context, workspace, paths)
        if chunk is not None:

            def chunk_with_cpu() -> float | None:
                with measure_cpu({"benchmark": this_process}) as use:
                    chunk()
                chunk_cpu.append(use)
                return use.wall

            variants["chunk"] = chunk_with_cpu
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
        pipeline_figure(context, samples, runs["pipeline"], poll, chunk_cpu)
    if "batch1" in samples:
        micro_batching_figure(context, samples)
    if context.wants("tiny_jobs"):
        try:
            with context.phase("tiny jobs"):
                tiny_jobs_figure(context, cluster, "dynamic" in cluster.workers, trace)
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
