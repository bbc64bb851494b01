"""``allocator``: the worker's default CPU configuration vs naive eager torch (no malloc
tuning, contiguous tensors), batch 32 at 224 px.

In two processes (``bench.alloc_child``), because glibc's malloc settings apply to a whole
process and must be made before torch allocates: one process cannot measure both. They are
started early and load their models while the services boot.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING
from typing import Any

from bench.context import Context
from bench.figures import Figure
from bench.figures import verdict_text
from bench.stats import interleave
from bench.stats import paired_ratios
from bench.stats import speedup
from scripts.launcher import ROOT
from scripts.launcher import die_with_parent

if TYPE_CHECKING:
    from bench.assets import Workspace

ALLOCATOR_SIZE = 224
ALLOCATOR_BATCH = 32


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
            cwd=ROOT,
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


def start_allocator(context: Context, workspace: Workspace, paths: list[Path]) -> AllocatorChildren:
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
