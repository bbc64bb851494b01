"""Peers: the benchmark's model served by other model servers, side by side with the pipeline.

``python -m bench.run --peers ray,torchserve`` (the ``bench`` extra: ``pip install -e
'.[bench]'``). Each peer serves the champion bundle with the pipeline worker's backend,
threads and allocator fix, at that peer's own best settings (server-side batching up to the
pipeline's batch size), on the same image files, and is measured against its own in-process
limit (its batch function called back to back in its driver process), so its ratio reads like
``pipeline/limit``.

Each peer runs in a driver process of its own (``python -m bench.peers.<module> SPEC RESULT``)
under a timeout: Ray's and TorchServe's processes and imports never enter the benchmark's
process, and a peer that cannot start, hangs or breaks is reported as not measured, never
stopping the run.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.peers.common import PeerResult
from bench.peers.common import PeerSpec

#: Peer name -> driver module under :mod:`bench.peers`.
PEERS: dict[str, str] = {"ray": "ray_serve", "torchserve": "torchserve"}
ROOT = Path(__file__).resolve().parents[2]
#: A driver loads the model twice, starts its server and measures a few rounds.
DRIVER_TIMEOUT = 600.0


class PeerUnavailable(RuntimeError):
    """Why a peer was not measured (not installed, did not start, failed, timed out)."""


@dataclass
class PeerRun:
    """A peer's measurement, or why there is none."""

    name: str
    result: PeerResult | None = None
    reason: str | None = None


def missing(name: str) -> str | None:
    """Why ``name`` cannot run here (checked before anything starts), or None."""
    extra = "the bench extra is not installed (pip install -e '.[bench]')"
    if name == "ray":
        if importlib.util.find_spec("ray") is None:
            return extra
    elif name == "torchserve":
        if importlib.util.find_spec("ts") is None:
            return extra
        if not (Path(sys.executable).parent / "torchserve").exists():
            return "no torchserve script next to this Python"
        if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
            return "no Java runtime (TorchServe 0.12 needs Java 17: apt-get install openjdk-17-jre)"
    else:
        return f"unknown peer (choose from {','.join(PEERS)})"
    return None


def run_peer(name: str, spec: PeerSpec, timeout: float = DRIVER_TIMEOUT) -> PeerRun:
    """Run one peer's driver and read its result; never raises for a peer's own failure."""
    reason = missing(name)
    if reason:
        return PeerRun(name, reason=reason)
    workdir = Path(spec.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    spec_path, result_path = workdir / "spec.json", workdir / "result.json"
    spec.write(spec_path)
    log = workdir / "driver.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    with log.open("wb") as out:
        driver = subprocess.Popen(
            [sys.executable, "-m", f"bench.peers.{PEERS[name]}", str(spec_path), str(result_path)],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        try:
            code = driver.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop_driver(driver)
            code = None
    _kill_leftovers(workdir)
    if code is None:
        return PeerRun(name, reason=f"timed out after {timeout:.0f} s ({_tail(log)})")
    if code != 0 or not result_path.is_file():
        return PeerRun(name, reason=f"driver exited {code}: {_tail(log)}")
    return PeerRun(name, result=PeerResult.read(result_path))


def _stop_driver(driver: subprocess.Popen[bytes]) -> None:
    """SIGTERM first (the driver stops its server in ``finally``), SIGKILL if it lingers."""
    try:
        os.killpg(driver.pid, signal.SIGTERM)
        driver.wait(timeout=60)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(driver.pid, signal.SIGKILL)
        driver.wait(timeout=10)


def _kill_leftovers(workdir: Path) -> None:
    """A driver killed before stopping TorchServe left its process group: kill it."""
    from bench.peers.torchserve import kill_group

    kill_group(workdir)


def _tail(log: Path, chars: int = 600) -> str:
    """The end of a driver's log, on one line: the error a report shows."""
    try:
        text = log.read_text(errors="replace").strip()
    except OSError:
        return "no log"
    lines = [line for line in text.splitlines() if line.strip()]
    return " | ".join(lines[-4:])[-chars:] or "empty log"
