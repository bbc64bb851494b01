"""JSON, Markdown and PNG outputs, plus the machine description that makes them readable.

A ratio means little without the machine it was taken on and how busy that machine was, so the
Markdown report starts with the CPU, cores, memory, library versions, the command line and the
load average before and after the run.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import shutil
import sys
import time
from datetime import UTC
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.figures import FIGURES
from bench.figures import LABELS
from bench.figures import Figure


def load_average() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except (OSError, ValueError):
        return [float(v) for v in os.getloadavg()]


class CpuAccount:
    """How much of the machine's CPU time other processes used while the benchmark ran.

    The load average after a run includes the benchmark's own processes, so it cannot say
    whether neighbours were busy. Machine-wide busy time (``/proc/stat``) minus the CPU time of
    this process and every child it waited for (workers, API, allocator processes) can.
    """

    def __init__(self) -> None:
        self.machine = self._machine_busy()
        self.own = self._own()
        self.started = time.monotonic()

    @staticmethod
    def _machine_busy() -> float:
        import psutil

        times = psutil.cpu_times()
        idle = times.idle + getattr(times, "iowait", 0.0)
        return sum(times) - idle

    @staticmethod
    def _own() -> float:
        own = resource.getrusage(resource.RUSAGE_SELF)
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime

    def others_share(self) -> dict[str, float]:
        """Shares of the machine's capacity (cores x wall time) used by us and by others."""
        wall = time.monotonic() - self.started
        capacity = wall * (os.cpu_count() or 1)
        busy = self._machine_busy() - self.machine
        own = self._own() - self.own
        return {
            "benchmark": round(own / capacity, 3) if capacity else 0.0,
            "other_processes": round(max(busy - own, 0.0) / capacity, 3) if capacity else 0.0,
        }


def load_note(before: list[float], share: dict[str, float]) -> str:
    """How busy the neighbours were: absolute speeds mean little when they competed."""
    cores = os.cpu_count() or 1
    others = share.get("other_processes", 0.0)
    if others >= 0.15:
        return (
            f"The machine was shared: other processes (other engineers' test suites) used "
            f"{others:.0%} of all cores' time during the run (1-minute load average "
            f"{before[0]:.1f} on {cores} cores before it started). Absolute speeds in this "
            "report are depressed and noisy; each ratio compares runs that shared that load."
        )
    return (
        f"Other processes used {others:.0%} of all cores' time during the run: the machine was "
        "quiet, so absolute speeds here are this machine's own (still a shared VM)."
    )


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict[str, Any]:
    """What the figures were measured on: enough to compare two reports."""
    import psutil

    info: dict[str, Any] = {
        "cpu": cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for module in ("torch", "onnxruntime", "numpy", "celery", "openvino"):
        try:
            info[module] = __import__(module).__version__
        except Exception:
            info[module] = None
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except Exception:
        pass
    return info


def write_outputs(
    out_dir: Path, document: dict[str, Any], figures: dict[str, Figure]
) -> dict[str, Path]:
    """``<timestamp>.json|md|png`` and ``latest.*`` copies; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    paths = {ext: out_dir / f"{stamp}.{ext}" for ext in ("json", "md", "png")}
    paths["json"].write_text(json.dumps(document, indent=2, default=str) + "\n")
    paths["md"].write_text(markdown(document, figures))
    plot(paths["png"], document, figures)
    for ext, path in list(paths.items()):
        latest = out_dir / f"latest.{ext}"
        shutil.copyfile(path, latest)
        paths[f"latest.{ext}"] = latest
    return paths


def _fmt_share(share: dict[str, float] | None) -> str:
    if not share:
        return "?"
    return (
        f"this benchmark {share['benchmark']:.0%}, other processes "
        f"{share['other_processes']:.0%} of all cores"
    )


def _fmt_load(values: list[float] | None) -> str:
    return " ".join(f"{v:.2f}" for v in values) if values else "?"


def markdown(document: dict[str, Any], figures: dict[str, Figure]) -> str:
    meta = document["meta"]
    host = meta["machine"]
    lines = [
        "# face-emotions benchmark",
        "",
        f"Command: `{meta['command']}`  ",
        f"Date: {meta['started']} to {meta['finished']} ({meta['wall_seconds']:.0f} s)  ",
        f"Mode: {meta['mode']}; {meta['images']} images at {meta['image_size']} px, "
        f"batch size {meta['batch_size']}"
        + (
            f" (in-process figures at {', '.join(map(str, meta['batch_sizes']))})"
            if len(meta.get("batch_sizes") or []) > 1
            else ""
        )
        + f", {meta['threads']} torch threads per worker, "
        f"device {meta['device']}",
        "",
        "Every figure is a ratio of two things measured side by side in this run (interleaved "
        "repetitions, medians); absolute times on this shared machine vary several-fold "
        "between runs minutes apart, ratios much less.",
        "",
        "## Machine",
        "",
        "| | |",
        "| --- | --- |",
        f"| CPU | {host['cpu']} |",
        f"| cores | {host['logical_cores']} logical ({host.get('usable_cores')} usable) |",
        f"| memory | {host['memory_gib']} GiB |",
    ]
    if host.get("gpu"):
        lines.append(f"| GPU | {host['gpu']} (CUDA {host.get('cuda')}) |")
    else:  # say so: the GPU figures (bench/gpu.sh) are missing from this report for that reason
        lines.append("| GPU | none on this machine, so `bench/gpu.sh` (CUDA figures) did not run |")
    lines += [
        f"| Python | {host['python']} ({host['platform']}) |",
        f"| torch / onnxruntime | {host.get('torch')} / {host.get('onnxruntime')} |",
        f"| openvino | {host.get('openvino') or 'not installed'} |",
        f"| load average before (1/5/15 min) | {_fmt_load(meta.get('load_before'))} |",
        f"| load average after | {_fmt_load(meta.get('load_after'))} |",
        "| CPU time used during the run | " + _fmt_share(meta.get("cpu_share")) + " |",
        "",
    ]
    if meta.get("load_note"):
        lines += [meta["load_note"], ""]
    lines += [
        "## Figures",
        "",
        "| figure | measured | target | met? |",
        "| --- | --- | --- | --- |",
    ]
    for key in FIGURES:
        figure = figures.get(key)
        if figure is None:
            continue
        target = figure.target.text if figure.target else "-"
        met = figure.met
        met_text = "-" if met is None else ("yes" if met else "**no**")
        cells = (LABELS[key], figure.measured, target, met_text)
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    lines += ["", "## Details", ""]
    for key in FIGURES:
        figure = figures.get(key)
        if figure is None:
            continue
        lines.append(f"### {LABELS[key]}")
        lines.append("")
        lines.append(f"`{figure.line}`")
        lines.append("")
        if figure.reason:
            lines.append(f"Not measured: {figure.reason}")
            lines.append("")
        for note in [*figure.details.get("notes", []), *_derived_notes(figure)]:
            lines.append(f"- {note}")
        if figure.details.get("notes"):
            lines.append("")
        table = figure.details.get("table")
        if table:
            lines += _table(table)
            lines.append("")
        cpu_table = figure.details.get("cpu_table")
        if cpu_table:
            lines += ["CPU during a run (medians):", "", *_table(cpu_table), ""]
    if document.get("analysis"):
        lines += ["## Where the time goes", ""]
        lines += [f"- {item}" for item in document["analysis"]]
        lines.append("")
    if document.get("errors"):
        lines += ["## Errors", ""]
        lines += [f"- {item}" for item in document["errors"]]
        lines.append("")
    return "\n".join(lines)


def _derived_notes(figure: Figure) -> list[str]:
    """Notes computed from a figure's recorded data (so a re-render can add them too)."""
    curve = figure.details.get("curve") if figure.key == "memory" else None
    if not curve or len(curve) < 3 or not curve[0][1] or not curve[1][1]:
        return []
    (_, start), (first_images, first), (images, end) = curve[0], curve[1], curve[-1]
    return [
        f"{(first / start - 1) * 100:+.1f}% came with the first job after warm-up "
        f"({first_images} images: caches and arenas reaching their working size), "
        f"{(end / first - 1) * 100:+.1f}% over the {images - first_images} images after it"
    ]


def _table(rows: list[dict[str, Any]]) -> list[str]:
    columns = list(rows[0])
    out = [
        "| " + " | ".join(_cell(c) for c in columns) + " |",
        "| " + " | ".join("---" for _ in columns) + " |",
    ]
    for row in rows:
        out.append("| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |")
    return out


def _cell(value: Any) -> str:
    """Table cells may hold ``|Δp|``: an unescaped pipe would split the cell."""
    return str(value).replace("|", "\\|")


def plot(path: Path, document: dict[str, Any], figures: dict[str, Figure]) -> None:
    """Ratios against their targets, and the worker's memory against images processed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speedups = [
        (key, f)
        for key, f in figures.items()
        if f.ratio is not None and key not in {"memory"} and f.details.get("plot_ratio", True)
    ]
    memory = figures.get("memory")
    curve = memory.details.get("curve") if memory is not None else None
    gpu = document.get("gpu_curves")
    panels = 1 + bool(curve) + bool(gpu)
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.8), squeeze=False)
    ax = axes[0][0]
    names = [LABELS[k] for k, _ in speedups]
    values = [f.ratio or 0.0 for _, f in speedups]
    colours = []
    for _key, f in speedups:
        met = f.met
        colours.append("tab:grey" if met is None else ("tab:green" if met else "tab:red"))
    ax.barh(names, values, color=colours)
    for index, (key, f) in enumerate(speedups):
        target = f.target
        floor = target is not None and target.kind in {"at_least", "above"}
        if target is not None and floor:
            ax.plot([target.value, target.value], [index - 0.4, index + 0.4], "k-", lw=2)
        right = max(values[index], target.value if target is not None and floor else 0)
        ax.text(right, index, f"  {values[index]:.2f}", va="center", fontsize=8)
        del key
    ax.set_xlabel("ratio (black tick: target; green met, red missed, grey no target)")
    ax.set_title(f"{document['meta']['mode']} run, {document['meta']['images']} images")
    ax.invert_yaxis()
    column = 1
    if curve:
        ax = axes[0][column]
        column += 1
        xs = [point[0] for point in curve]
        ys = [point[1] / 2**20 for point in curve]
        ax.plot(xs, ys, "o-")
        if ys:
            ax.axhspan(ys[0], ys[0] * 1.05, color="tab:green", alpha=0.15, label="+5% of baseline")
            ax.set_ylim(ys[0] * 0.9, max(max(ys), ys[0] * 1.05) * 1.05)
        ax.set_xlabel("images classified by the worker after warm-up")
        ax.set_ylabel("pool process RSS (MiB)")
        ax.set_title("worker memory")
        ax.legend(loc="lower right")
    if gpu:
        ax = axes[0][column]
        for name, points in gpu.items():
            ax.plot([p[0] for p in points], [p[1] for p in points], "o-", label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size")
        ax.set_ylabel("images/s (this run)")
        ax.set_title(f"{document['meta']['device']} throughput by batch size")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def command_line() -> str:
    return " ".join([Path(sys.executable).name, "-m", "bench.run", *sys.argv[1:]])


def rerender(json_path: Path) -> dict[str, Path]:
    """Rebuild the Markdown and the plot of a JSON report with the current layout.

    The numbers come from the JSON unchanged; only their presentation (and the load note,
    recomputed from the recorded CPU account) follows this code.
    """
    document = json.loads(json_path.read_text())
    fields = ("key", "ratio", "measured", "line", "check", "reason", "details")
    figures = {
        key: Figure(**{name: data.get(name) for name in fields})
        for key, data in document["figures"].items()
    }
    for figure in figures.values():
        figure.details = figure.details or {}
    meta = document["meta"]
    if meta.get("cpu_share"):
        meta["load_note"] = load_note(meta["load_before"], meta["cpu_share"])
    json_path.write_text(json.dumps(document, indent=2, default=str) + "\n")
    md_path, png_path = json_path.with_suffix(".md"), json_path.with_suffix(".png")
    md_path.write_text(markdown(document, figures))
    plot(png_path, document, figures)
    return {"json": json_path, "md": md_path, "png": png_path}


if __name__ == "__main__":
    # python -m bench.report bench/results/latest.json: re-render after a layout change.
    for argument in sys.argv[1:]:
        written = rerender(Path(argument))
        print(f"bench.report: wrote {written['md']}, {written['png']}")
