"""Which device an inference process runs its model on: one GPU per pool process, round-robin.

A worker that sees several GPUs runs one prefork pool process per GPU (``EMOTIONS_WORKER_PROCESSES``
``auto``), and pool process ``i`` (Celery/billiard's process index, the ``%i`` of log file names,
kept by the process that replaces it) uses visible GPU ``i % n``, as TorchServe spreads its
workers. ``EMOTIONS_DEVICE`` decides:

- ``auto``: CUDA devices round-robin when there are any, else the CPU;
- ``cuda``: the same, but no CUDA device is an error rather than a CPU fallback;
- ``cuda:N``: every process on device N (an error when fewer than N + 1 are visible);
- ``cpu``: every process on the CPU.

Devices are numbered as CUDA numbers them for this process, after ``CUDA_VISIBLE_DEVICES``.
Everything here but :func:`cuda_device_count` is pure, so the assignment is tested with made-up
device counts.
"""

from __future__ import annotations

import re
from typing import Literal

from face_emotions.settings import DEVICE_PATTERN

#: What ``EMOTIONS_DEVICE`` (and the ``device`` of a Predictor) may say.
_DEVICE = re.compile(DEVICE_PATTERN)


def parse_device(requested: str) -> tuple[str, int | None]:
    """``("auto" | "cpu" | "cuda", index or None)``; ``ValueError`` for anything else."""
    match = _DEVICE.fullmatch(requested.strip().lower())
    if match is None:
        raise ValueError(
            f"device {requested!r} is not one of auto, cpu, cuda or cuda:N (N a device number)"
        )
    kind, _, index = match.group(1).partition(":")
    return kind, int(index) if index else None


def assign_device(requested: str, process_index: int, device_count: int) -> str:
    """The device (``cpu`` or ``cuda:N``) of pool process ``process_index`` when
    ``device_count`` CUDA devices are visible and ``requested`` (EMOTIONS_DEVICE) says so.

    Raises ``ValueError`` for a malformed request and ``RuntimeError`` for one this machine
    cannot serve (CUDA asked for without a device, ``cuda:N`` beyond the visible ones).
    """
    kind, index = parse_device(requested)
    if kind == "cpu" or (kind == "auto" and device_count <= 0):
        return "cpu"
    if device_count <= 0:
        raise RuntimeError(f"device {requested!r} requested but CUDA is not available")
    if index is not None:
        if index >= device_count:
            raise RuntimeError(
                f"device {requested!r} requested but only {device_count} CUDA device(s) are "
                f"visible (cuda:0 to cuda:{device_count - 1}, numbered after "
                "CUDA_VISIBLE_DEVICES)"
            )
        return f"cuda:{index}"
    return f"cuda:{max(process_index, 0) % device_count}"


def worker_processes(setting: int | Literal["auto"], requested: str, device_count: int) -> int:
    """Pool processes of an inference worker (EMOTIONS_WORKER_PROCESSES).

    ``auto`` is one per visible CUDA device when the processes run on CUDA (``auto`` or
    ``cuda``), else 1: a CPU worker, or one forced onto a single GPU with ``cuda:N``.
    """
    if setting != "auto":
        return setting
    kind, index = parse_device(requested)
    if kind == "cpu" or index is not None or device_count <= 0:
        return 1
    return device_count


def cuda_device_count() -> int:
    """CUDA devices this process may use (``CUDA_VISIBLE_DEVICES`` applies), 0 without CUDA.

    Safe in a worker's main process before it forks its pool: ``torch.cuda.device_count``
    asks NVML and does not initialise CUDA (which a forked child could not use); only where
    NVML is missing does it fall back to the CUDA runtime. ``torch.cuda.is_available`` is not
    called here for that reason.
    """
    import torch

    return max(torch.cuda.device_count(), 0)
