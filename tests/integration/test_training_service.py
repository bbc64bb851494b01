"""Training as a service, the way users run it: the README's request body, a trainer started with
compose's own command line, progress while it trains, promotion, and a running inference worker
that serves the new version without a restart; and an admin's cancel of a running run."""

from __future__ import annotations

import json
import re
import shlex
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from face_emotions.data.sample_faces import write_sample_dataset
from scripts.launcher import Launcher
from scripts.launcher import ServiceProcess
from scripts.launcher import log_ready
from tests.integration.conftest import ROOT
from tests.integration.conftest import wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "integration-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TERMINAL = {"succeeded", "failed", "cancelled"}


def readme_training_body() -> dict:
    """The body of the README's ``POST /api/v1/training-runs`` example, unchanged."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### Retraining and promotion through the API", 1)[1]
    match = re.search(r"-d '(\{.*?\})'", section, re.S)
    assert match, "the README lost its training-run example"
    return json.loads(match[1])


def compose_command(service: str) -> list[str]:
    """The service's command in docker-compose.yml, run with this interpreter."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"][service]["command"]
    command = shlex.split(command) if isinstance(command, str) else list(command)
    assert command[0] == "celery", command
    return [sys.executable, "-m", *command]


def start_trainer(services, tmp_path: Path) -> ServiceProcess:
    launcher = Launcher(services.env(), tmp_path, cwd=ROOT, append_logs=False)
    trainer = launcher.start("trainer", compose_command("trainer"), log_ready)
    trainer.wait_ready(90)
    return trainer


def api_client(services):
    from api.app import create_app

    services.extra_env["EMOTIONS_ADMIN_TOKEN"] = TOKEN
    app = create_app(services.settings(admin_token=TOKEN))
    app.config["TESTING"] = True
    return app.test_client()


def follow_run(client, location: str, trainer: ServiceProcess, timeout: float) -> list[dict]:
    """Every state the run was seen in, until it finished."""
    seen: list[dict] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body = client.get(location, headers=AUTH).get_json()
        seen.append(body)
        if body["status"] in TERMINAL:
            return seen
        trainer.check_alive()
        time.sleep(1)
    raise TimeoutError(f"{location} not finished in {timeout}s: {seen[-1]}\n{trainer.log_tail()}")


def run_job(client, folder: str) -> dict:
    response = client.post("/api/v1/jobs", json={"folder": folder})
    assert response.status_code == 202, response.get_json()
    job = wait_for_job(client, response.get_json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    return job


def run_processes(run_id: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        cmdline = process.info["cmdline"] or []
        if "training.run_process" in cmdline and run_id in cmdline:
            found.append(process)
    return found


@pytest.mark.parametrize("services", ["postgresql"], indirect=True)
def test_the_readme_training_run_is_trained_promoted_and_served(
    services, start_worker, model_store, tmp_path: Path
) -> None:
    client = api_client(services)
    registry = model_store.registry()
    previous = registry.alias_version().version
    body = readme_training_body()
    write_sample_dataset(services.data_root / body["data"], per_class=8, seed=5, progress=False)
    write_sample_dataset(services.data_root / "probe", per_class=2, seed=99, progress=False)

    server = start_worker("server")
    trainer = start_trainer(services, tmp_path)
    try:
        assert run_job(client, "probe")["model_versions"] == [previous]
        pids = (server.process.pid, server.pool_pids())

        response = client.post("/api/v1/training-runs", json=body, headers=AUTH)
        assert response.status_code == 202, response.get_json()
        assert "warning" not in response.get_json(), "a live trainer was not noticed"
        seen = follow_run(client, response.headers["Location"], trainer, timeout=900)
        run = seen[-1]
        assert run["status"] == "succeeded", f"{run}\n{trainer.log_tail()}"
        assert run["attempts"] == 1 and run["error"] is None and run["mlflow_run_id"]

        # Progress while it ran: epochs, steps, validation metrics, an ETA.
        training = [s["progress"] for s in seen if (s["progress"] or {}).get("stage") == "training"]
        assert training, [s["progress"] for s in seen]
        assert training[-1]["max_epochs"] == body["epochs"] and training[-1]["total_steps"]
        assert any("val_loss" in p["metrics"] for p in training), training[-1]
        assert any(p["eta_seconds"] is not None for p in training)

        new = run["registered_version"]
        assert new is not None and new not in model_store.versions
        if run["promoted"]:
            assert run["promotion_reason"].startswith(f"v{new} is now champion"), run
        else:  # the README's next step: promote it by hand
            assert f"v{previous} stays champion" in run["promotion_reason"], run
            promoted = client.post(f"/api/v1/models/{new}/promote", headers=AUTH)
            assert promoted.get_json() == {
                "version": new,
                "previous": previous,
                "alias": "champion",
            }
        assert registry.alias_version().version == new

        after = run_job(client, "probe")
        assert after["model_versions"] == [new], server.log()
        assert (server.process.pid, server.pool_pids()) == pids, "the worker restarted"
        listing = client.get("/api/v1/models", headers=AUTH).get_json()
        assert {w["model_version"] for w in listing["workers"]} == {new}
        assert [t["name"].split("@")[0] for t in listing["trainers"]] == ["trainer"]
        log = trainer.log_path.read_text(errors="replace")
        assert log.count(f"MLflow run {run['mlflow_run_id']}") == 1, "log lines are doubled"
    finally:
        trainer.stop()
        registry.set_alias(previous)


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_an_admin_cancels_a_running_run(services, model_store, tmp_path: Path) -> None:
    from face_emotions.registry.mlflow_registry import Registry

    client = api_client(services)
    write_sample_dataset(services.data_root / "faces", per_class=8, seed=6, progress=False)
    trainer = start_trainer(services, tmp_path)
    try:
        response = client.post(
            "/api/v1/training-runs",
            json={"model": "cnn", "epochs": 500, "data": "faces", "promote": "never"},
            headers=AUTH,
        )
        assert response.status_code == 202, response.get_json()
        location, run_id = response.headers["Location"], response.get_json()["id"]
        deadline = time.monotonic() + 300
        while True:
            body = client.get(location, headers=AUTH).get_json()
            if (body["progress"] or {}).get("stage") == "training" and body["mlflow_run_id"]:
                break
            assert body["status"] in {"queued", "running"}, body
            assert time.monotonic() < deadline, f"never started training: {body}"
            time.sleep(0.5)
        assert run_processes(run_id), "the run has no process of its own"

        cancel = client.delete(location, headers=AUTH)
        assert cancel.status_code == 202, cancel.get_json()
        assert cancel.get_json()["cancel_requested"] is True
        stopped = follow_run(client, location, trainer, timeout=60)[-1]
        assert stopped["status"] == "cancelled", stopped
        assert stopped["registered_version"] is None
        assert not run_processes(run_id), "the run's process outlived its cancel"
        mlflow_run = Registry(services.settings()).client.get_run(stopped["mlflow_run_id"])
        assert mlflow_run.info.status == "KILLED"
        trainer.check_alive()  # the trainer itself goes on serving the queue
    finally:
        trainer.stop()
