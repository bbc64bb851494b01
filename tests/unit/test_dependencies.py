"""Every package the code imports is declared in pyproject.toml, so a clean install has it.

A package that only arrives as someone else's dependency (kombu through Celery, click through
Flask) can vanish or change major version in a routine upgrade of that other package; declared,
it is pinned to a range the code was written for.
"""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIRST_PARTY = {
    "face_emotions",
    "api",
    "worker",
    "training",
    "migrations",
    "scripts",
    "bench",
    "tests",
}
#: Imported only when present (the benchmark compares backends that are optional extras).
OPTIONAL = {"openvino"}
RUNTIME_CODE = ("face_emotions", "api", "worker", "training", "migrations")
DEV_CODE = ("scripts", "bench", "tests")


def _declared(requirements: list[str]) -> set[str]:
    return {_normalise(re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0]) for r in requirements}


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported(folders: tuple[str, ...]) -> set[str]:
    modules: set[str] = set()
    for folder in folders:
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    modules |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    modules.add(node.module.split(".")[0])
    return modules - FIRST_PARTY - OPTIONAL - set(sys.stdlib_module_names)


PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
#: Installed with --no-deps by make setup and the image (their metadata pins are stale).
NO_DEPS = _declared(
    [
        line.strip()
        for line in (ROOT / "requirements-nodeps.txt").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
)
RUNTIME = _declared(PYPROJECT["project"]["dependencies"]) | NO_DEPS
DEV = _declared(PYPROJECT["project"]["optional-dependencies"]["dev"])
#: The benchmark's peers (bench/peers/: Ray Serve, TorchServe), an extra of their own.
BENCH = _declared(PYPROJECT["project"]["optional-dependencies"]["bench"])
DISTRIBUTIONS = importlib.metadata.packages_distributions()


@pytest.mark.parametrize(
    ("folders", "allowed"),
    [(RUNTIME_CODE, RUNTIME), (DEV_CODE, RUNTIME | DEV | BENCH)],
    ids=["runtime", "dev"],
)
def test_every_imported_package_is_declared(folders: tuple[str, ...], allowed: set[str]) -> None:
    missing = {
        module: sorted(DISTRIBUTIONS.get(module, [module]))
        for module in sorted(_imported(folders))
        if not {_normalise(d) for d in DISTRIBUTIONS.get(module, [module])} & allowed
    }
    assert not missing, f"imported but not declared in pyproject.toml: {missing}"
