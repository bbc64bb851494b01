"""TorchServe as a peer: ``python -m bench.peers.torchserve SPEC RESULT`` (a driver process).

TorchServe 0.12 (Java frontend, one Python backend worker) serving the worker's predictor
through :mod:`bench.peers.torchserve_handler`, with server-side batching: the model is
registered over REST with ``batch_size`` = the pipeline's batch size and ``max_batch_delay``
= 10 ms, one worker (``default_workers_per_model=1``; the worker has the pipeline's torch
threads), system metrics off (they start a Python process every minute). Measured over HTTP
(``POST /predictions/emotions``, ``Content-Type: application/octet-stream``, many
connections), interleaved with this peer's own in-process limit.

Everything TorchServe writes (pid file via ``TMPDIR``, logs, model store, config) is in the
driver's work directory, so ``torchserve --stop`` stops this server only; it is started in a
process group of its own, killed as a whole if stopping fails. The group id is written to
``torchserve.pgid`` so the benchmark can kill it too if this driver itself is killed.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bench.peers import common
from bench.stats import interleave

MODEL = "emotions"
HANDLER = Path(__file__).with_name("torchserve_handler.py")
#: Written as soon as TorchServe is started: the process group to kill if all else fails.
PGID_FILE = "torchserve.pgid"


def _bin(name: str) -> str:
    """A console script of this interpreter's environment (the venv's torchserve)."""
    return str(Path(sys.executable).parent / name)


def environment(workdir: Path) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ)
    env.update(
        TMPDIR=str(workdir / "tmp"),  # TorchServe's pid file lives in tempfile.gettempdir()
        LOG_LOCATION=str(workdir / "logs"),
        METRICS_LOCATION=str(workdir / "logs"),
        PYTHONPATH=os.pathsep.join([root, *filter(None, [os.environ.get("PYTHONPATH")])]),
        PATH=os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    return env


def write_config(workdir: Path, spec: common.PeerSpec) -> tuple[Path, dict[str, int]]:
    ports = {name: common.free_port() for name in ("inference", "management", "metrics")}
    lines = [
        f"inference_address=http://127.0.0.1:{ports['inference']}",
        f"management_address=http://127.0.0.1:{ports['management']}",
        f"metrics_address=http://127.0.0.1:{ports['metrics']}",
        f"model_store={workdir / 'model-store'}",
        "disable_token_authorization=true",
        "enable_model_api=true",
        "default_workers_per_model=1",
        "disable_system_metrics=true",
        "install_py_dep_per_model=false",
        # Enough queue for every connection's request while a batch runs.
        f"job_queue_size={max(1000, 4 * spec.connections)}",
        "default_response_timeout=300",
    ]
    path = workdir / "config.properties"
    path.write_text("\n".join(lines) + "\n")
    return path, ports


def archive(workdir: Path, spec: common.PeerSpec) -> None:
    """``emotions.mar``: the handler, and ``peer.json`` saying which bundle/backend to load."""
    peer = workdir / "peer.json"
    peer.write_text(
        json.dumps(
            {
                "bundle_dir": spec.bundle_dir,
                "backend": spec.backend,
                "threads": spec.threads,
                "batch_size": spec.batch_size,
            }
        )
    )
    subprocess.run(
        [
            _bin("torch-model-archiver"),
            "--model-name",
            MODEL,
            "--version",
            "1.0",
            "--handler",
            str(HANDLER),  # its module-level handle() is the entry point
            "--extra-files",
            str(peer),
            "--export-path",
            str(workdir / "model-store"),
            "--force",
        ],
        check=True,
        timeout=120,
        capture_output=True,
    )


def request(method: str, url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=timeout) as r:
        return bytes(r.read())


def stop(workdir: Path, env: dict[str, str]) -> None:
    """``torchserve --stop`` (this work directory's pid file), then the whole process group."""
    try:
        subprocess.run(
            [_bin("torchserve"), "--stop", "--foreground"],
            env=env,
            cwd=workdir,
            timeout=90,
            capture_output=True,
        )
    except Exception as exc:
        print(f"torchserve: --stop failed: {exc}", file=sys.stderr)
    kill_group(workdir)


def kill_group(workdir: Path) -> None:
    """SIGKILL what is left of the group TorchServe was started in (java, its workers)."""
    pgid_file = workdir / PGID_FILE
    if not pgid_file.is_file():
        return
    pgid = int(pgid_file.read_text())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    pgid_file.unlink(missing_ok=True)


def measure(spec: common.PeerSpec) -> common.PeerResult:
    workdir = Path(spec.workdir)
    for sub in ("tmp", "logs", "model-store"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    payloads = common.read_payloads(spec.files)
    predictor = common.load_predictor(spec.bundle_dir, spec.backend, spec.threads, spec.batch_size)
    expected = common.reference(predictor, payloads, spec.batch_size)
    archive(workdir, spec)
    config, ports = write_config(workdir, spec)
    env = environment(workdir)
    version = torchserve_version()
    try:
        with (workdir / "logs" / "torchserve.out").open("wb") as out:
            # --start returns once java is launched, but keeps its output pipe open: a file.
            launcher = subprocess.Popen(
                [
                    _bin("torchserve"),
                    "--start",
                    "--ncs",
                    "--model-store",
                    str(workdir / "model-store"),
                    "--ts-config",
                    str(config),
                ],
                env=env,
                cwd=workdir,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        (workdir / PGID_FILE).write_text(str(launcher.pid))
        inference = f"http://127.0.0.1:{ports['inference']}"
        management = f"http://127.0.0.1:{ports['management']}"
        common.wait_until(
            lambda: request("GET", f"{inference}/ping", 5), spec.start_timeout, "TorchServe /ping"
        )
        started = time.perf_counter()
        request(
            "POST",
            f"{management}/models?url={MODEL}.mar&batch_size={spec.batch_size}"
            f"&max_batch_delay={round(spec.batch_wait_ms)}&initial_workers=1"
            "&synchronous=true&response_timeout=300",
            spec.start_timeout,
        )
        load_seconds = time.perf_counter() - started
        url = f"{inference}/predictions/{MODEL}"
        _, answers = common.http_load(url, payloads, spec.connections)  # warm, and check

        def http_path() -> float:
            return common.http_load(url, payloads, spec.connections)[0]

        def limit() -> None:
            common.limit_loop(predictor, payloads, spec.batch_size)

        samples = interleave({"limit": limit, "HTTP": http_path}, len(payloads), spec.rounds)
        return common.PeerResult(
            samples={name: s.seconds for name, s in samples.items()},
            images=len(payloads),
            settings={
                "torchserve": version,
                "backend": predictor.backend,
                "workers": 1,
                "threads": spec.threads,
                "batch_size": spec.batch_size,
                "max_batch_delay_ms": round(spec.batch_wait_ms),
                "http_connections": spec.connections,
                "register_seconds": round(load_seconds, 1),
            },
            notes=[
                f"TorchServe {version}: 1 worker ({spec.threads} threads), registered with "
                f"batch_size={spec.batch_size}, max_batch_delay={round(spec.batch_wait_ms)} ms, "
                f"system metrics off; HTTP: {spec.connections} connections"
            ],
            max_abs_diff=common.max_abs_diff(answers, expected),
        )
    finally:
        stop(workdir, env)


def torchserve_version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version

    try:
        return version("torchserve")
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(common.driver_main(measure, sys.argv[1:]))
