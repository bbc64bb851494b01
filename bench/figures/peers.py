"""``peers``: the pipeline against other model servers serving the same model, side by side.

``--peers ray,torchserve`` (needs the ``bench`` extra). Each peer serves the champion bundle
with the pipeline worker's backend, threads and allocator fix at its own best settings
(:mod:`bench.peers`), on the same files, after the services have stopped. Its ratio is its
throughput over its own in-process limit (its batch function called back to back), as
``pipeline/limit`` is the pipeline's over the bench's ``limit``; the pipeline's numbers are
the ones this run's ``pipeline`` figure recorded.

Met when the pipeline's ratio is above every measured peer's HTTP ratio and its images/s are
above every measured peer's HTTP images/s. The figure's ratio is the smaller margin: the
pipeline's ratio over the best peer HTTP ratio, or its images/s over the best peer HTTP
images/s, whichever is smaller (above 1 = met).
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bench.context import Context
from bench.figures import Figure
from bench.figures import unavailable
from bench.figures import verdict_text

if TYPE_CHECKING:
    from pathlib import Path

    from bench.assets import Workspace
    from bench.peers import PeerRun

#: Peers the benchmark knows (``--peers``); the drivers live in :mod:`bench.peers`.
PEER_NAMES = ("ray", "torchserve")
#: Client connections of each peer's HTTP path: enough to fill a server-side batch twice.
HTTP_CONNECTIONS = 64
#: How long a peer's server-side batcher waits for a batch to fill.
BATCH_WAIT_MS = 10.0


def peer_list(text: str) -> list[str]:
    """``--peers`` values: a comma list of :data:`PEER_NAMES` (argparse ``type``)."""
    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = sorted(set(names) - set(PEER_NAMES))
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown peers {unknown}; choose from {','.join(PEER_NAMES)}"
        )
    return names


@dataclass(frozen=True)
class PathRate:
    """One way into one peer: its images/s and the peer's own in-process limit."""

    peer: str
    path: str  # "handle" or "HTTP"
    rate: float
    limit_rate: float

    @property
    def ratio(self) -> float:
        return self.rate / self.limit_rate


def peers_figure(
    context: Context, workspace: Workspace, bundle_dir: Path, paths: list[Path]
) -> None:
    """Run each asked peer (never raising for one) and record the figure."""
    names: list[str] = list(getattr(context.args, "peers", None) or [])
    if not names:
        context.record(
            unavailable("peers", "not asked (--peers ray,torchserve; needs the bench extra)")
        )
        return
    if context.args.device != "cpu":
        context.record(unavailable("peers", "peers are measured on CPU runs only"))
        return
    try:
        with context.phase("peers"):
            runs = measure_peers(context, workspace, bundle_dir, paths, names)
        context.record(compare(context, runs))
    except Exception as exc:
        context.failed("peers", exc)


def serving_backend(context: Context) -> str:
    """The backend the pipeline worker served with (as the ``limit`` figure recorded it), or
    ``auto`` (a peer then tunes as a worker would) when no limit ran."""
    limit = context.figures.get("limit")
    name = limit.details.get("backend_name") if limit is not None else None
    return str(name) if name else "auto"


def measure_peers(
    context: Context, workspace: Workspace, bundle_dir: Path, paths: list[Path], names: list[str]
) -> dict[str, PeerRun]:
    from bench.peers import PeerSpec
    from bench.peers import run_peer

    backend = serving_backend(context)
    runs = {}
    for name in names:
        spec = PeerSpec(
            bundle_dir=str(bundle_dir),
            files=[str(p) for p in paths],
            batch_size=context.batch_size,
            threads=context.threads,
            backend=backend,
            rounds=max(context.plan.rounds, 3),
            connections=HTTP_CONNECTIONS,
            workdir=str(workspace.root / "peers" / name),
            batch_wait_ms=BATCH_WAIT_MS,
        )
        run = run_peer(name, spec)
        runs[name] = run
        if run.reason:
            print(f"  peer {name}: not measured: {run.reason}", flush=True)
    return runs


def compare(context: Context, runs: Mapping[str, PeerRun]) -> Figure:
    """The figure from peer results and the pipeline figure this run recorded."""
    from bench.stats import Samples

    rates: list[PathRate] = []
    reasons: dict[str, str] = {}
    notes: list[str] = []
    settings: dict[str, object] = {}
    for name, run in runs.items():
        if run.result is None:
            reasons[name] = run.reason or "not measured"
            continue
        result = run.result
        samples = {k: Samples(result.images, v) for k, v in result.samples.items()}
        limit = samples["limit"].rate
        for path in ("handle", "HTTP"):
            if path in samples:
                rates.append(PathRate(name, path, samples[path].rate, limit))
        notes += result.notes
        if result.max_abs_diff is not None:
            notes.append(
                f"{name}: max |Δp| vs this run's in-process predictor {result.max_abs_diff:.1e}"
            )
        settings[name] = {
            **result.settings,
            "samples": {k: s.as_dict() for k, s in samples.items()},
        }
    pipeline = context.figures.get("pipeline")
    pipeline_rate = pipeline_ratio = None
    if pipeline is not None and pipeline.ratio is not None:
        pipeline_ratio = pipeline.ratio
        pipeline_rate = float(pipeline.details["pipeline"]["items_per_second"])
    figure = peers_table(pipeline_rate, pipeline_ratio, rates, reasons)
    figure.details["notes"] = notes + figure.details["notes"]
    figure.details["peers"] = settings
    return figure


def peers_table(
    pipeline_rate: float | None,
    pipeline_ratio: float | None,
    rates: list[PathRate],
    reasons: Mapping[str, str],
) -> Figure:
    """The figure from numbers alone (what the unit test injects).

    ``ratio`` (and ``check``) is the pipeline's smallest margin over the peers' HTTP paths:
    min over peers of min(pipeline ratio / peer ratio, pipeline img/s / peer img/s); above 1
    means the pipeline beat every measured peer on both counts.
    """
    table = []
    if pipeline_rate is not None and pipeline_ratio is not None:
        table.append(
            {
                "peer": "pipeline (REST job, Celery worker)",
                "path": "HTTP",
                "img/s": f"{pipeline_rate:.1f}",
                "own limit img/s": f"{pipeline_rate / pipeline_ratio:.1f}",
                "ratio": f"{pipeline_ratio:.2f}",
            }
        )
    for item in rates:
        table.append(
            {
                "peer": item.peer,
                "path": item.path,
                "img/s": f"{item.rate:.1f}",
                "own limit img/s": f"{item.limit_rate:.1f}",
                "ratio": f"{item.ratio:.2f}",
            }
        )
    for name, reason in reasons.items():
        table.append(
            {
                "peer": name,
                "path": "-",
                "img/s": "-",
                "own limit img/s": "-",
                "ratio": f"not measured: {reason}",
            }
        )
    details: dict[str, object] = {
        "table": table,
        "not_measured": dict(reasons),
        "notes": [
            "ratio of each row = its img/s over its own in-process limit (the pipeline's: "
            "the bench's limit loop; a peer's: its batch function back to back in its "
            "driver process, decode + preprocess + forward of the same files)",
            "met: the pipeline's ratio above every peer's HTTP ratio and its img/s above every "
            "peer's HTTP img/s; the figure's number is the smaller margin (above 1 = met)",
            "each ratio is interleaved with its own limit (same load); the img/s of different "
            "rows are not: the peers run one after the other once the services have stopped, "
            "so on a shared machine compare their img/s with the load figures above in mind",
        ],
    }
    http = [item for item in rates if item.path == "HTTP"]
    missing = "; ".join(f"{name}: {reason[:160]}" for name, reason in reasons.items())
    if not http:
        reason = "no peer measured" + (f" ({missing})" if missing else "")
        figure = unavailable("peers", reason)
        figure.details.update(details)
        return figure
    if pipeline_rate is None or pipeline_ratio is None:
        figure = unavailable("peers", "the pipeline figure was not measured in this run")
        figure.details.update(details)
        return figure
    margin = min(min(pipeline_ratio / item.ratio, pipeline_rate / item.rate) for item in http)
    peers_text = ", ".join(
        f"{item.peer} {item.path} {item.ratio:.2f} ({item.rate:.1f} img/s)" for item in rates
    )
    measured = (
        f"pipeline {pipeline_ratio:.2f} of its limit ({pipeline_rate:.1f} img/s) vs {peers_text}"
    )
    if missing:
        measured += f"; not measured: {missing}"
    line = f"peers: {measured}; margin {margin:.2f} ({verdict_text('peers', margin)})"
    # Judged as printed (2 decimals), as verdict_text does: "1.00: yes" cannot happen.
    margin = round(margin, 2)
    return Figure("peers", margin, measured, line, check=margin, details=details)
