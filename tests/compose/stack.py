"""Drives a compose project the way a user does: ``docker compose -p NAME -f ... <command>``.

Every call goes through the real CLI (Compose v2 on the engine `make test-compose` started), so
what is tested is what `docker compose up` runs in production.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any
from typing import TypeVar

import requests

REPO = Path(__file__).resolve().parents[2]
T = TypeVar("T")


def say(message: str) -> None:
    """The run's story in `make test-compose`'s log (pytest runs with -s)."""
    print(f"[compose {time.strftime('%H:%M:%S')}] {message}", flush=True)


def wait_for(what: str, probe: Callable[[], T | None], timeout: float, every: float = 2) -> T:
    """``probe()`` until it returns something truthy; the last error explains a time-out."""
    deadline = time.monotonic() + timeout
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = probe()
        except (requests.RequestException, subprocess.CalledProcessError, KeyError) as error:
            last, value = error, None
        if value:
            return value
        time.sleep(every)
    raise TimeoutError(f"{what}: not within {timeout:.0f} s (last: {last!r})")


@dataclass
class ComposeProject:
    name: str
    files: list[str]
    env: dict[str, str]
    started: bool = field(default=False, init=False)

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> str:
        command = ["docker", "compose", "-p", self.name]
        for file in self.files:
            command += ["-f", file]
        done = subprocess.run(
            [*command, *args],
            cwd=REPO,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and done.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(args)} failed ({done.returncode}):\n"
                f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            )
        return done.stdout

    def up(self, *args: str) -> None:
        self.started = True
        self.compose("up", "-d", *args, timeout=900)

    def containers(self, service: str) -> list[dict[str, Any]]:
        """``docker compose ps`` of one service's containers (running or not)."""
        out = self.compose("ps", "--all", "--format", "json", service)
        rows = [json.loads(line) for line in out.splitlines() if line.strip()]
        return [row for row in rows if row.get("Service") == service]

    def hostnames(self, service: str) -> dict[str, str]:
        """Container hostname (what workers record, ``host:pid``) -> container name."""
        names = [row["Name"] for row in self.containers(service)]
        found = {}
        for name in names:
            hostname = subprocess.run(
                ["docker", "inspect", "--format", "{{.Config.Hostname}}", name],
                env=self.env,
                capture_output=True,
                text=True,
                check=True,
            ).stdout.strip()
            found[hostname] = name
        return found

    def health(self, service: str) -> list[str]:
        return [row.get("Health") or row.get("State", "") for row in self.containers(service)]

    def logs(self, tail: int = 80) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), check=False)

    def down(self) -> None:
        if self.started:
            self.compose("down", "-v", "--remove-orphans", "--timeout", "20", check=False)

    @contextmanager
    def until_down(self, what: str) -> Iterator[None]:
        """Run the block, print the project's logs if it fails, and always ``down -v``."""
        try:
            yield
        except BaseException:
            say(f"{what} logs:\n" + self.logs())
            raise
        finally:
            self.down()
            say(f"{what} {self.name}: down -v")


def docker(*args: str, env: dict[str, str]) -> str:
    return subprocess.run(
        ["docker", *args], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()
