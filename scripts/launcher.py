"""The one way developer tooling starts the stack: ``make demo``, the benchmark and the tests.

The API, inference workers, the trainer and the embedded Redis are started here as background
processes, each in its own session (so stopping one stops its whole process group: gunicorn's
workers, Celery's pool processes) with its output in a log file of its own (so a failure can
be explained with the log's tail). The command lines are those of ``docker-compose.yml`` and
``Dockerfile.gpu``, so what the demo, the benchmark and the tests run is what is deployed.

This is tooling: the services (``api/``, ``worker/``, ``training/``) never import it.

- :class:`Launcher` knows the commands and where logs (and, for the demo, pid files) go;
- :class:`ServiceProcess` is one started (or, from a pid file, found) process: readiness,
  a clear error with the log tail when it exits early, and stop (SIGTERM, then SIGKILL);
- :func:`stop_process` stops what a pid file names, so ``make stop`` works across invocations.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
#: gunicorn as compose and Dockerfile.gpu run it (every option is in ``api/gunicorn_conf.py``);
#: options a caller adds come after these and win, so ``--workers 1`` overrides.
API_OPTIONS: tuple[str, ...] = ("--config=python:api.gunicorn_conf",)
APP = "api.wsgi:app"
#: Compose's access log on stdout is for ``docker logs``; here a line per request would cost
#: the benchmark's polls and fill the demo's log, so it is off unless the environment sets it.
API_ENV: dict[str, str] = {"EMOTIONS_API_ACCESS_LOG": ""}
#: Every worker's options beside app, queue, pool and name: gossip and mingle are off (nothing
#: here uses them, and they slow every start by seconds), INFO shows each task in the log.
WORKER_OPTIONS: tuple[str, ...] = ("--without-gossip", "--without-mingle", "--loglevel", "INFO")
#: Celery's flag for "the worker consumes": printed once the pool is up and the queue bound.
WORKER_READY = "ready."
#: How often readiness is probed: short against start-ups of seconds, cheap on 2 cores.
POLL_SECONDS = 0.2


class ServiceError(RuntimeError):
    """A service exited or did not become ready; the message carries its log tail."""


class ServiceTimeout(ServiceError, TimeoutError):
    """Alive but not ready in time; a ``TimeoutError`` too, as the tests' own loops raised."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the kernel's pick), for one more API or a
    worker's metrics: parallel test runs and benchmarks on one machine must not collide."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """``preexec_fn``: the kernel sends SIGTERM to the service when its parent dies.

    A benchmark killed by a CI timeout runs no cleanup; without this its API and workers (in
    their own sessions, on purpose) would keep running and consuming the cores. Linux only
    (``prctl(PR_SET_PDEATHSIG)``); the signal fires when the thread that started it exits.
    """
    import ctypes

    pr_set_pdeathsig = 1
    with contextlib.suppress(Exception):
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, signal.SIGTERM)


def http_ready(url: str) -> Callable[[], bool]:
    """Readiness probe: ``GET url`` answers 2xx (``/healthz``: the app is up; ``/readyz``:
    it also reaches its database, broker and registry)."""

    def probe() -> bool:
        import requests

        try:
            return requests.get(url, timeout=5).ok
        except requests.RequestException:  # not listening yet, or still importing
            return False

    return probe


def log_ready(path: Path, offset: int = 0, text: str = WORKER_READY) -> Callable[[], bool]:
    """Readiness probe: ``text`` appeared in the log after byte ``offset``.

    Logs are appended to across runs (the demo's), so only what this start wrote counts.
    """
    needle = text.encode()

    def probe() -> bool:
        try:
            with path.open("rb") as log:
                log.seek(offset)
                return needle in log.read()
        except OSError:
            return False

    return probe


def pid_alive(pid: int, *, group: bool = False) -> bool:
    """Whether process ``pid`` (with ``group``: any process of the group it leads; zombies
    count until reaped) exists. Signal 0 only probes."""
    try:
        (os.killpg if group else os.kill)(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def _reap(pid: int) -> None:
    """Collect the leader's exit status if it is our child, so it stops counting as alive."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_group(
    pid: int,
    timeout: float = 20,
    sig: int = signal.SIGTERM,
    reap: Callable[[], object] | None = None,
) -> bool:
    """Send ``sig`` to the process group, SIGKILL it if anything is left after ``timeout``.

    SIGTERM is a warm shutdown for both Celery (the running chunk finishes) and gunicorn, so
    it gets time; the whole group is waited for, not only its leader, so no pool process
    outlives the stop. ``reap`` collects the leader's exit status (``Popen.poll`` for our own
    child, so its return code stays right). True if something was running.
    """
    reap = reap or (lambda: _reap(pid))
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        reap()
        return False
    if not _gone(pid, timeout, reap):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        _gone(pid, timeout, reap)
    return True


def _gone(pid: int, timeout: float, reap: Callable[[], object]) -> bool:
    """Wait up to ``timeout`` for the group to be empty; False if something is left."""
    deadline = time.monotonic() + timeout
    while True:
        reap()
        if not pid_alive(pid, group=True):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text())
    except (OSError, ValueError):
        return None


def stop_process(pid_file: Path, timeout: float = 20) -> bool:
    """Stop the process group a pid file names and remove the file; True if it was running.

    The demo exits and leaves its services running; ``make stop`` (another process, later)
    only has these files to find them.
    """
    pid = read_pid(pid_file)
    if pid is None:
        return False
    pid_file.unlink(missing_ok=True)
    return stop_group(pid, timeout)


@dataclass
class ServiceProcess:
    """One background service: started by a :class:`Launcher`, or found from its pid file.

    ``popen`` is None for a process a previous invocation started (the demo's second run):
    it can still be probed, waited for and stopped, by pid.
    """

    name: str
    pid: int
    log_path: Path
    ready: Callable[[], bool] = field(repr=False)
    popen: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    pid_file: Path | None = None
    url: str | None = None  # the base URL of an HTTP service (the API)

    def alive(self) -> bool:
        if self.popen is not None:
            return self.popen.poll() is None
        return pid_alive(self.pid)

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def check_alive(self) -> None:
        """Raise :class:`ServiceError` with the log tail if the process has exited: waiting
        out a timeout for a service that crashed at import only hides why."""
        if not self.alive():
            code = self.popen.returncode if self.popen is not None else "?"
            raise ServiceError(f"{self.name} exited ({code}):\n{self.log_tail()}")

    def wait_ready(self, timeout: float = 90) -> None:
        wait_ready([self], timeout)

    def stop(self, timeout: float = 15, sig: int = signal.SIGTERM) -> bool:
        """``sig`` to the whole group, SIGKILL after ``timeout``; forgets the pid file."""
        if self.pid_file is not None:
            self.pid_file.unlink(missing_ok=True)
        return stop_group(self.pid, timeout, sig, None if self.popen is None else self.popen.poll)


def wait_ready(processes: Iterable[ServiceProcess], timeout: float = 90) -> None:
    """Wait until every process is ready, all at once (their start-ups overlap).

    Fails fast with :class:`ServiceError` when any exits, and with :class:`ServiceTimeout`
    naming the ones still not ready (with their log tails) after ``timeout`` seconds.
    """
    processes = list(processes)
    pending = processes
    deadline = time.monotonic() + timeout
    while True:
        for process in processes:  # a ready one that dies meanwhile counts too
            process.check_alive()
        pending = [process for process in pending if not process.ready()]
        if not pending:
            return
        if time.monotonic() > deadline:
            raise ServiceTimeout(
                "not ready after {:.0f}s: {}\n{}".format(
                    timeout,
                    ", ".join(p.name for p in pending),
                    "\n".join(p.log_tail(2000) for p in pending),
                )
            )
        time.sleep(POLL_SECONDS)


@dataclass
class Launcher:
    """Starts services with one environment, from one directory, logging into one folder.

    ``run_dir`` (the demo's ``var/run``) makes every start write ``<name>.pid`` there, so a
    later invocation can find, reuse or stop it. ``die_with_parent`` ties the services' lives
    to this process (the benchmark's; the demo's services must outlive the demo). With
    ``append_logs`` a log keeps earlier runs (the demo's history); without, each start begins
    a fresh file (a test reading a worker's log sees only that worker).
    """

    env: Mapping[str, str]
    log_dir: Path
    cwd: Path = ROOT
    run_dir: Path | None = None
    die_with_parent: bool = False
    append_logs: bool = True

    def start(
        self,
        name: str,
        command: list[str],
        ready: Callable[[Path, int], Callable[[], bool]],
        *,
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
        url: str | None = None,
    ) -> ServiceProcess:
        """Spawn ``command`` in its own session; ``ready`` builds its readiness probe from the
        log path and the log's size before the start."""
        log_path = log_path or self.log_dir / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = log_path.stat().st_size if self.append_logs and log_path.exists() else 0
        with log_path.open("ab" if self.append_logs else "wb") as log:
            popen = subprocess.Popen(
                command,
                cwd=self.cwd,
                env={**self.env, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_parent
                if self.die_with_parent and sys.platform == "linux"
                else None,
            )
        pid_file = None
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            pid_file = self.pid_file(name)
            pid_file.write_text(str(popen.pid))
        return ServiceProcess(
            name, popen.pid, log_path, ready(log_path, offset), popen, pid_file, url
        )

    def api(
        self,
        *options: str,
        port: int | None = None,
        host: str = "127.0.0.1",
        name: str = "api",
        ready_path: str = "/readyz",
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> ServiceProcess:
        """gunicorn serving ``api.wsgi:app`` with compose's options plus ``options`` (e.g.
        ``--workers 1``), on ``port`` (a free one by default); ready when ``ready_path``
        answers (``/readyz``, or ``/healthz`` where the registry may be absent)."""
        port = port or free_port(host)
        url = f"http://{host}:{port}"
        bind = f"{host}:{port}"
        command = [sys.executable, "-m", "gunicorn", *API_OPTIONS, "--bind", bind, *options, APP]
        probe = http_ready(url + ready_path)
        env = {**API_ENV, **{k: v for k, v in self.env.items() if k in API_ENV}, **(env or {})}
        return self.start(
            name, command, lambda _log, _offset: probe, env=env, log_path=log_path, url=url
        )

    def worker(
        self,
        name: str = "worker",
        *,
        node: str | None = None,
        app: str = "worker.app",
        queue: str = "inference",
        concurrency: int = 1,
        pool: str = "prefork",
        env: Mapping[str, str] | None = None,
        log_path: Path | None = None,
    ) -> ServiceProcess:
        """A Celery worker (by default an inference worker), ready at its ``ready.`` line.

        ``node`` is Celery's ``-n`` (default ``<name>@%h``), the name remote control (the
        benchmark's add/cancel_consumer) addresses.
        """
        command = [sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue]
        command += ["--concurrency", str(concurrency), "--pool", pool, *WORKER_OPTIONS]
        command += ["-n", node or f"{name}@%h"]
        return self.start(name, command, log_ready, env=env, log_path=log_path)

    def trainer(
        self, name: str = "trainer", *, node: str | None = None, **worker: Any
    ) -> ServiceProcess:
        """The training service: a Celery worker of ``training.service`` on queue ``training``
        (compose's ``trainer``), one run at a time; ``worker``: :meth:`worker`'s options."""
        return self.worker(name, node=node, app="training.service", queue="training", **worker)

    def redis(self, folder: Path, name: str = "redis") -> ServiceProcess:
        """The embedded Redis of ``scripts/embedded_redis.py`` (for machines without one),
        ready once it has written its Unix socket's path to ``<folder>/socket``."""
        socket_file = folder / "socket"
        socket_file.unlink(missing_ok=True)  # a stale one from a killed run is not readiness
        command = [sys.executable, "-m", "scripts.embedded_redis", str(folder)]
        return self.start(name, command, lambda _log, _offset: socket_file.exists)

    # -- services of earlier invocations (the demo's pid files) --------------------------

    def pid_file(self, name: str) -> Path:
        if self.run_dir is None:
            raise ValueError("this launcher keeps no pid files (no run_dir)")
        return self.run_dir / f"{name}.pid"

    def running(self, name: str) -> int | None:
        """The pid ``<name>.pid`` records, if that process is still alive."""
        pid = read_pid(self.pid_file(name))
        return pid if pid is not None and pid_alive(pid) else None

    def attach(
        self, name: str, ready: Callable[[], bool], url: str | None = None
    ) -> ServiceProcess | None:
        """The running service ``<name>.pid`` names, as a :class:`ServiceProcess` (without a
        Popen: another invocation started it), or None."""
        pid = self.running(name)
        if pid is None:
            return None
        log_path = self.log_dir / f"{name}.log"
        return ServiceProcess(name, pid, log_path, ready, pid_file=self.pid_file(name), url=url)

    def stop(self, name: str, timeout: float = 20) -> bool:
        """Stop what ``<name>.pid`` names (see :func:`stop_process`)."""
        return stop_process(self.pid_file(name), timeout)
