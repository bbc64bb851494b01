"""Training as a service: REST API -> Redis -> a real trainer process -> MLflow -> a running
inference worker that serves the new version without a restart."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from face_emotions.data.sample_faces import write_sample_dataset
from tests.integration.conftest import WorkerProcess
from tests.integration.conftest import wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "integration-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The seed's baseline at a narrow width and 64 px, no augmentation: learns the generated faces
# in a few epochs on two CPU cores (see test_training.py).
TINY_CNN = [
    "model.image_size=64",
    "model.options.width=16",
    "model.options.depth=5",
    "training=fast",
    "training.lr=0.005",
    "training.augment=false",
    "export_onnx=false",
]


def wait_for_run(client, location: str, *, timeout: float, trainer: WorkerProcess) -> dict:
    deadline = time.monotonic() + timeout
    body: dict = {}
    while time.monotonic() < deadline:
        body = client.get(location, headers=AUTH).get_json()
        if body["status"] in {"succeeded", "failed"}:
            return body
        if trainer.process.poll() is not None:
            raise RuntimeError(f"the trainer exited:\n{trainer.log()}")
        time.sleep(0.5)
    raise TimeoutError(f"run {location} did not finish in {timeout}s: {body}\n{trainer.log()}")


def wait_for_log(worker: WorkerProcess, text: str, *, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in worker.log_path.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise TimeoutError(f"{text!r} not in the log of {worker.name}:\n{worker.log()}")


def run_job(client, folder: str) -> dict:
    response = client.post("/api/v1/jobs", json={"folder": folder})
    assert response.status_code == 202, response.get_json()
    job = wait_for_job(client, response.get_json()["id"], timeout=120)
    assert job["status"] == "succeeded", job
    return job


@pytest.mark.parametrize("services", ["postgresql"], indirect=True)
def test_training_run_is_promoted_and_served_without_a_restart(
    services, start_worker, model_store, tmp_path: Path
) -> None:
    from api.app import create_app

    services.extra_env["EMOTIONS_ADMIN_TOKEN"] = TOKEN
    app = create_app(services.settings(admin_token=TOKEN))
    app.config["TESTING"] = True
    client = app.test_client()

    registry = model_store.registry()
    champion = registry.alias_version()
    assert champion is not None
    previous = champion.version
    write_sample_dataset(services.data_root / "faces", per_class=60, seed=5, progress=False)
    write_sample_dataset(services.data_root / "probe", per_class=2, seed=99, progress=False)

    server = start_worker("server")
    trainer = start_worker("trainer", app="training.service", queue="training")
    try:
        # The worker serves the session's champion (random weights, accuracy tag 0.5).
        before = run_job(client, "probe")
        assert before["model_versions"] == [previous], server.log()
        pids = (server.process.pid, server.pool_pids())

        # A bad override fails its run with Hydra's message, once, without touching the model.
        bad = client.post(
            "/api/v1/training-runs",
            json={"data": "faces", "overrides": ["training.no_such_key=1"]},
            headers=AUTH,
        )
        assert bad.status_code == 202, bad.get_json()
        failed = wait_for_run(client, bad.headers["Location"], timeout=60, trainer=trainer)
        assert failed["status"] == "failed", failed
        assert "no_such_key" in failed["error"] and failed["attempts"] == 1
        assert failed["registered_version"] is None and failed["promoted"] is False

        started = time.monotonic()
        response = client.post(
            "/api/v1/training-runs",
            json={
                "model": "cnn",
                "epochs": 6,
                "data": "faces",
                "promote": "auto",
                "overrides": TINY_CNN,
            },
            headers=AUTH,
        )
        assert response.status_code == 202, response.get_json()
        assert "warning" not in response.get_json()
        run = wait_for_run(client, response.headers["Location"], timeout=300, trainer=trainer)
        elapsed = time.monotonic() - started
        assert run["status"] == "succeeded", f"{run}\n{trainer.log()}"
        new = run["registered_version"]
        assert new is not None and new not in model_store.versions
        # auto evaluated the champion on this run's test split and the trained model won.
        assert run["promoted"] is True, run
        assert run["promotion_reason"].startswith("beats the champion"), run
        assert run["mlflow_run_id"] and run["attempts"] == 1 and run["error"] is None
        assert run["metrics"]["test_accuracy"] > 0.3, run["metrics"]  # chance: 0.2
        assert isinstance(run["metrics"]["passed_targets"], bool)
        assert registry.alias_version().version == new
        listed = client.get("/api/v1/training-runs", headers=AUTH).get_json()
        assert [item["id"] for item in listed["items"]] == [run["id"], failed["id"]]
        print(f"\ntraining run: {elapsed:.1f}s, metrics {run['metrics']}")

        # The trainer's broadcast (or the 1 s poll) made the worker load the new version in
        # the background; the next micro-batch swaps to it.
        wait_for_log(server, f"loaded face-emotion version {new}", timeout=60)
        after = run_job(client, "probe")
        assert after["model_versions"] == [new], server.log()
        assert (server.process.pid, server.pool_pids()) == pids, "the worker restarted"
        assert "broadcast emotions_reload_model" in trainer.log_path.read_text()
    finally:
        registry.set_alias(previous)
