"""``pipeline``: the same images as one REST folder job on one worker, submit to finished,
over ``limit``; decomposed through the worker's chunk code run in this process, so a loss can
be put on the chunk code or on the processes around it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

from bench.context import Context
from bench.figures import Figure
from bench.figures import verdict_text
from bench.figures.limit import limit_best
from bench.stats import Samples
from bench.stats import paired_ratios
from bench.stats import speedup

if TYPE_CHECKING:
    from pathlib import Path

    from bench.assets import Workspace
    from bench.cpu_use import CpuUse
    from bench.inprocess import ChunkLoop
    from bench.services import JobRun


def chunk_loop(context: Context, workspace: Workspace, paths: list[Path]) -> ChunkLoop | None:
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
    context: Context,
    samples: dict[str, Samples],
    runs: list[JobRun],
    poll_seconds: float,
    chunk_cpu: list[CpuUse] | None = None,
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
    median_queued = _upper_median([b.get("queued_seconds", 0.0) for b in breakdowns])
    median_running = _upper_median([b.get("running_seconds", 0.0) for b in breakdowns])
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
    tail = pipeline.median - median_queued - median_running
    context.analysis += [
        f"pipeline job ({pipeline.items} images), medians: {pipeline.median:.2f} s from POST to "
        f"seen finished = {median_queued:.2f} s queued + {median_running:.2f} s running + "
        f"{tail:.2f} s for the POST itself and the answer of the waiting status request; the "
        f"limit loop took {limit.median:.2f} s for the same files",
        f"one status request (GET /api/v1/jobs/<id>) costs {poll_seconds * 1000:.1f} ms in "
        "the API (median of 30): a client polling every 0.1 s would keep about "
        f"{poll_seconds / 0.1:.0%} of one core busy (plus its HTTP handling), on a machine with "
        f"{os.cpu_count()} cores that the worker's {context.threads} threads also need; the "
        "job is followed with ?wait= instead, one request that the API answers at its end",
    ]
    if chunk is not None and median_running:
        context.analysis.append(
            _loss_story(speedup(chunk, limit), pipeline.items / median_running / limit.rate)
        )
    cpu_table = _cpu_table(pipeline.items, chunk_cpu or [], [r.cpu for r in runs if r.cpu])
    if cpu_table:
        context.analysis.append(_cpu_story(cpu_table))
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
                    f"{context.threads} torch threads), timed from POST to the answer of a "
                    "status request waiting for its end (GET /api/v1/jobs/<id>?wait=30, "
                    "answered within 0.05 s of the end, as the CLI follows a job)",
                    "limit, in-process chunk and pipeline repetitions alternate, so all saw the "
                    "same load",
                ],
                "table": decomposition,
                "cpu_table": cpu_table,
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


def _upper_median(values: list[float]) -> float:
    """The middle value, the upper one of an even count: always one that was measured."""
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _cpu_table(images: int, chunk: list[CpuUse], jobs: list[CpuUse]) -> list[dict[str, str]]:
    """Median CPU per image and cores kept busy, by part: the chunk code in this process and
    the REST job (worker pool and main process, API, this benchmark, everything else)."""

    def row(run: str, part: str, uses: list[CpuUse], seconds: Callable[[CpuUse], float]) -> dict:
        return {
            "run": run,
            "part": part,
            "CPU ms/image": f"{1000 * _upper_median([seconds(u) for u in uses]) / images:.1f}",
            "cores busy": f"{_upper_median([seconds(u) / u.wall for u in uses if u.wall]):.2f}",
        }

    rows = []
    if chunk:
        rows.append(
            row("chunk code in-process", "this process", chunk, lambda u: u.parts["benchmark"])
        )
        rows.append(row("chunk code in-process", "rest of the machine", chunk, lambda u: u.other))
    if jobs:
        for part in jobs[0].parts:
            rows.append(row("REST job", part, jobs, partial(_part_seconds, part)))
        rows.append(row("REST job", "rest of the machine", jobs, lambda u: u.other))
    return rows


def _part_seconds(part: str, use: CpuUse) -> float:
    return use.parts[part]


def _cpu_story(table: list[dict[str, str]]) -> str:
    """One line: does the worker spend more CPU per image than the chunk code in this process,
    or get fewer cores?"""
    cells = {(r["run"], r["part"]): r for r in table}
    inproc = cells.get(("chunk code in-process", "this process"))
    pool = cells.get(("REST job", "worker pool"))
    if inproc is None or pool is None:
        return "CPU use: " + "; ".join(
            f"{r['run']}, {r['part']}: {r['CPU ms/image']} ms/image" for r in table
        )
    around = [
        f"{part} {cells[('REST job', part)]['cores busy']}"
        for part in ("worker main", "API", "benchmark", "rest of the machine")
        if ("REST job", part) in cells
    ]
    return (
        f"CPU per image: the chunk code used {inproc['CPU ms/image']} ms in this process "
        f"({inproc['cores busy']} cores busy) and {pool['CPU ms/image']} ms in the worker's pool "
        f"process ({pool['cores busy']} cores busy); cores kept busy beside the worker during "
        f"the job: {', '.join(around)}"
    )
