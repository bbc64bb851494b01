"""The production compose stack, built and run for real (`make test-compose`).

docker-compose.yml + docker-compose.cpu.yml (+ tests/compose/docker-compose.images.yml, which
only swaps the third-party images for local stand-ins) start exactly what users start. Through
the API's published port the test trains a version in the trainer container, sees it promoted,
scales to two worker containers that share one job, kills a worker container mid-job and sees
that job finish with one result per image, and adds a second compose project
(docker-compose.worker-host.yml) whose worker reaches the first project's services only through
their published ports, as a worker host on another machine does.
"""

from __future__ import annotations

import io
import ipaddress
import json
import os
import secrets
import socket
import zipfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
import requests

from face_emotions.data.sample_faces import write_sample_dataset
from tests.compose.stack import ComposeProject
from tests.compose.stack import docker
from tests.compose.stack import say
from tests.compose.stack import wait_for

pytestmark = [pytest.mark.compose, pytest.mark.timeout(3600)]

STACK_FILES = [
    "docker-compose.yml",
    "docker-compose.cpu.yml",
    "tests/compose/docker-compose.images.yml",
]
WORKER_HOST_FILES = ["docker-compose.worker-host.yml", "docker-compose.cpu.yml"]
JOB_IMAGES = 768  # six chunks at the default batch size (32) x chunk batches (4)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("", 0))
        return int(probe.getsockname()[1])


class Api:
    def __init__(self, url: str, token: str) -> None:
        self.url = url
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {token}"

    def get(self, path: str, **params: object) -> dict:
        response = self.session.get(self.url + path, params=params, timeout=30)
        response.raise_for_status()
        return response.json()

    def post(self, path: str, **kwargs: object) -> requests.Response:
        return self.session.post(self.url + path, timeout=120, **kwargs)  # type: ignore[arg-type]

    def submit_zip(self, archive: bytes) -> str:
        response = self.post("/api/v1/jobs", files={"files": ("faces.zip", archive)})
        assert response.status_code == 202, response.text
        return response.json()["id"]

    def job(self, job_id: str) -> dict:
        return self.get(f"/api/v1/jobs/{job_id}")

    def finished(self, job_id: str) -> dict | None:
        job = self.job(job_id)
        return job if job["status"] in {"succeeded", "failed", "cancelled"} else None

    def inference_workers(self) -> list[dict]:
        return list(self.get("/api/v1/models")["workers"])


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The stack's /data: generated faces to train on and to classify (uid 10001 reads it)."""
    root = tmp_path_factory.mktemp("data")
    write_sample_dataset(root / "faces", per_class=24, seed=1, progress=False)
    write_sample_dataset(root / "incoming", per_class=JOB_IMAGES // 5 + 1, seed=2, progress=False)
    os.chmod(root, 0o755)
    for path in root.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)
    return root


def zip_of(folder: Path, count: int) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for path in sorted(folder.rglob("*.*"))[:count]:
            archive.write(path, f"{path.parent.name}-{path.name}")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def engine_env() -> dict[str, str]:
    """The caller's environment minus the test suite's own EMOTIONS_* settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")}


@pytest.fixture(scope="module")
def bind_address(engine_env: dict[str, str]) -> str:
    """Where the first project publishes its services: the default bridge's gateway, an
    address containers of other projects reach as another host's private address.

    An engine's first start on a fresh data root records only the bridge's subnet (the gateway
    shows from its next start): the gateway is then the subnet's first address, as Docker
    assigns it.
    """
    config = json.loads(
        docker("network", "inspect", "bridge", "--format", "{{json .IPAM.Config}}", env=engine_env)
    )
    gateway = config[0].get("Gateway") if config else None
    if not gateway and config and config[0].get("Subnet"):
        gateway = str(ipaddress.ip_network(config[0]["Subnet"]).network_address + 1)
    assert gateway, f"the default bridge has no gateway or subnet: {config}"
    return gateway


@pytest.fixture(scope="module")
def stack(
    engine_env: dict[str, str], data_dir: Path, bind_address: str
) -> Iterator[tuple[ComposeProject, Api, dict[str, str]]]:
    token = secrets.token_urlsafe(24)
    ports = {
        name: str(free_port())
        for name in (
            "API_PORT",
            "POSTGRES_PORT",
            "REDIS_PORT",
            "MINIO_PORT",
            "MINIO_CONSOLE_PORT",
            "MLFLOW_PORT",
        )
    }
    env = {
        **engine_env,
        **ports,
        "APP_IMAGE": os.environ.get("APP_IMAGE", "face-emotions:compose-test"),
        "EMOTIONS_ADMIN_TOKEN": token,
        "ADMIN_BIND_ADDRESS": bind_address,
        # As the README says for worker hosts: MLflow answers the address they call it by.
        "MLFLOW_ALLOWED_HOSTS": "mlflow,mlflow:*,localhost,localhost:*,127.0.0.1,127.0.0.1:*,"
        f"{bind_address},{bind_address}:*",
        "DATA_VOLUME": str(data_dir),
    }
    project = ComposeProject(f"fe-ctest-{secrets.token_hex(3)}", STACK_FILES, env)
    say(
        f"project {project.name}: up (CPU override, stand-in images), "
        f"API on port {ports['API_PORT']}"
    )
    with project.until_down("project"):
        project.up()
        api = Api(f"http://127.0.0.1:{ports['API_PORT']}", token)
        wait_for("API healthy", lambda: project.health("api") == ["healthy"], timeout=300)
        ready = wait_for("readyz", lambda: api.get("/readyz"), timeout=120)
        say(f"API ready: {ready}")
        yield project, api, env


def results_by_worker(env: dict[str, str], job_id: str) -> tuple[int, int, Counter[str]]:
    """(rows, distinct images, rows per worker host) of one job, read from the stack's
    PostgreSQL through its published port, as an operator would."""
    url = f"postgresql://emotions:emotions@{env['ADMIN_BIND_ADDRESS']}:{env['POSTGRES_PORT']}/emotions"
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT r.image_id, r.worker FROM results r JOIN images i ON i.id = r.image_id"
            " WHERE i.job_id = %s",
            (job_id,),
        ).fetchall()
    hosts = Counter(str(worker).split(":")[0] for _, worker in rows)
    return len(rows), len({image for image, _ in rows}), hosts


def test_compose_stack_trains_scales_survives_a_killed_worker_and_adds_a_worker_host(
    stack: tuple[ComposeProject, Api, dict[str, str]], data_dir: Path, engine_env: dict[str, str]
) -> None:
    project, api, env = stack

    # 1. Train through the API; the trainer container runs it and the version is promoted.
    response = api.post(
        "/api/v1/training-runs",
        json={"model": "efficientnet_lite0", "epochs": 1, "data": "faces", "promote": "auto"},
    )
    assert response.status_code == 202, response.text
    run_url = response.headers["Location"]
    say(f"training run {response.json()['id']} queued")
    run = wait_for(
        "training run finished", lambda: _finished_run(api, run_url), timeout=1200, every=5
    )
    say(
        f"training run {run['status']}: version {run['registered_version']}, promoted "
        f"{run['promoted']} ({run['promotion_reason']}), metrics {run['metrics']}"
    )
    assert run["status"] == "succeeded", run
    assert run["promoted"], run
    models = api.get("/api/v1/models")
    assert models["champion"] == run["registered_version"], models
    say(f"champion is version {models['champion']}")

    # 2. Two worker containers share one job.
    project.up("--scale", "worker=2", "--no-recreate")
    workers = project.hostnames("worker")
    say(f"scaled to worker containers {sorted(workers.values())}")
    assert len(workers) == 2
    wait_for(
        "both workers heartbeating",
        lambda: {w["name"].split(":")[0] for w in api.inference_workers()} >= set(workers),
        timeout=300,
    )
    job = api.submit_zip(zip_of(data_dir / "incoming", JOB_IMAGES))
    done = wait_for(f"job {job}", lambda: api.finished(job), timeout=900)
    rows, images, hosts = results_by_worker(env, job)
    say(f"job {job}: {done['status']}, {rows} results by {_named(hosts, workers)}")
    assert done["status"] == "succeeded" and rows == images == JOB_IMAGES
    assert set(hosts) == set(workers), hosts

    # 3. Kill a worker container mid-job: the other one and the recovery sweeper finish it.
    killed_job = api.submit_zip(zip_of(data_dir / "incoming", JOB_IMAGES))
    wait_for(
        "first chunk of the job to kill",
        lambda: (
            api.job(killed_job)["done"] >= 128 and api.job(killed_job)["done"] < JOB_IMAGES - 256
        ),
        timeout=600,
        every=0.5,
    )
    busy = [w["name"].split(":")[0] for w in api.inference_workers() if w["state"] == "busy"]
    victim_host = busy[0] if busy else next(iter(workers))
    victim = workers[victim_host]
    docker("kill", victim, env=engine_env)
    say(f"killed worker container {victim} (SIGKILL) at {api.job(killed_job)['done']}/{JOB_IMAGES}")

    # 4. A second compose project, as on another host: only published ports reach the first.
    remote_env = {
        **engine_env,
        "APP_IMAGE": env["APP_IMAGE"],
        "CORE_HOST": env["ADMIN_BIND_ADDRESS"],
        "DATA_VOLUME": env["DATA_VOLUME"],
        **{k: env[k] for k in ("POSTGRES_PORT", "REDIS_PORT", "MLFLOW_PORT", "MINIO_PORT")},
    }
    remote = ComposeProject(f"{project.name}-host2", WORKER_HOST_FILES, remote_env)
    with remote.until_down("worker host project"):
        remote.up()
        remote_workers = remote.hostnames("worker")
        say(f"worker host project {remote.name}: {sorted(remote_workers.values())}")
        wait_for(
            "the worker host's worker heartbeating",
            lambda: (
                {w["name"].split(":")[0] for w in api.inference_workers()} >= set(remote_workers)
            ),
            timeout=300,
        )
        remote_job = api.submit_zip(zip_of(data_dir / "incoming", JOB_IMAGES))
        done = wait_for(f"job {remote_job}", lambda: api.finished(remote_job), timeout=900)
        rows, images, hosts = results_by_worker(env, remote_job)
        say(
            f"job {remote_job}: {done['status']}, {rows} results by "
            f"{_named(hosts, {**workers, **remote_workers})}"
        )
        assert done["status"] == "succeeded" and rows == images == JOB_IMAGES
        assert set(hosts) & set(remote_workers), hosts

        # 5. The killed container's job finishes, one result per image.
        done = wait_for(f"killed job {killed_job}", lambda: api.finished(killed_job), timeout=900)
        rows, images, hosts = results_by_worker(env, killed_job)
        say(
            f"killed container's job {killed_job}: {done['status']}, {rows} results for "
            f"{images} images by {_named(hosts, {**workers, **remote_workers})}"
        )
        assert done["status"] == "succeeded", done
        assert rows == images == JOB_IMAGES
        assert done["done"] == JOB_IMAGES and done["failed"] == 0


def _finished_run(api: Api, location: str) -> dict | None:
    run = api.get(location)
    return run if run["status"] in {"succeeded", "failed", "cancelled"} else None


def _named(hosts: Counter[str], containers: dict[str, str]) -> str:
    return ", ".join(f"{containers.get(host, host)}: {n}" for host, n in sorted(hosts.items()))
