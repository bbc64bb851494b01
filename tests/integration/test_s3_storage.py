"""Storage for more than one host: the API stores uploads in S3, a worker process reads them.

The API (Flask test client) and a real Celery worker share nothing but the database, the
broker and an S3-compatible server (``moto_server``, a separate process): the worker could be
on another host. Folder jobs read an ``s3://`` data root the same way.
"""

from __future__ import annotations

import io
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from face_emotions.jobs.migrate import upgrade
from face_emotions.settings import Settings
from scripts.launcher import Launcher
from scripts.launcher import free_port
from scripts.launcher import http_ready
from tests.integration.conftest import ROOT
from tests.integration.conftest import ModelStore
from tests.integration.conftest import Services
from tests.integration.conftest import wait_for_job
from tests.integration.test_batch_jobs import all_results
from tests.integration.test_batch_jobs import assert_seed_shape
from tests.integration.test_batch_jobs import face_png
from tests.integration.test_server_hardening import compose_api_command
from tests.s3_fixtures import MotoServer
from tests.zip_archives import make_zip

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def s3_api(services: Services, **overrides: str):
    """The API app of ``services`` with storage (and perhaps the data root) in S3."""
    from api.app import create_app

    settings = Settings(**{**services.settings().model_dump(), **overrides})
    app = create_app(settings)
    app.config["TESTING"] = True
    return app.test_client()


@pytest.mark.parametrize("services", ["postgresql"], indirect=True)
def test_uploads_and_folder_jobs_through_s3(
    services: Services, start_worker, moto_server: MotoServer
) -> None:
    run = uuid.uuid4().hex[:8]
    uploads = moto_server.create_bucket(f"uploads-{run}")
    data = moto_server.create_bucket(f"data-{run}")
    storage_url = f"s3://{uploads}/shared"
    data_root = f"s3://{data}/faces"
    api = s3_api(
        services,
        storage_url=storage_url,
        s3_endpoint_url=moto_server.endpoint_url,
        data_root=data_root,
    )
    # The worker is told only the storage endpoint and credentials; it never sees the API's disk.
    start_worker(EMOTIONS_STORAGE_URL=storage_url, **moto_server.env())

    files = [(io.BytesIO(face_png(i)), f"face_{i}.png") for i in range(5)]
    upload = api.post("/api/v1/jobs", data={"files": files, "batch_size": "2"})
    assert upload.status_code == 202, upload.get_json()
    upload_id = upload.get_json()["id"]
    assert moto_server.keys(uploads) == [f"shared/jobs/{upload_id}/face_{i}.png" for i in range(5)]

    archive = make_zip([(f"nested/z_{i}.png", face_png(100 + i)) for i in range(3)])
    zipped = api.post("/api/v1/jobs", data={"files": [(archive, "faces.zip")]})
    assert zipped.status_code == 202, zipped.get_json()
    zip_id = zipped.get_json()["id"]
    assert moto_server.keys(uploads, f"shared/jobs/{zip_id}/") == [
        f"shared/jobs/{zip_id}/00000{i}.png" for i in range(3)
    ]

    for i in range(4):
        moto_server.put(data, f"faces/batch/sub/f_{i}.png", face_png(200 + i))
    moto_server.put(data, "faces/batch/broken.png", b"not an image")
    moto_server.put(data, "faces/batch/.hidden.png", face_png(300))
    folder = api.post("/api/v1/jobs", json={"folder": "batch", "recursive": True})
    assert folder.status_code == 202, folder.get_json()
    assert api.post("/api/v1/jobs", json={"folder": "../x"}).status_code == 400
    assert api.post("/api/v1/jobs", json={"folder": "missing"}).status_code == 400

    for job_id, expected in ((upload_id, 5), (zip_id, 3)):
        job = wait_for_job(api, job_id, timeout=90)
        assert job["status"] == "succeeded", job
        assert (job["total"], job["done"], job["failed"]) == (expected, expected, 0)
        items = all_results(api, job_id)
        assert len(items) == expected
        assert_seed_shape(items)

    job = wait_for_job(api, folder.get_json()["id"], timeout=90)
    assert job["status"] == "completed_with_errors", job
    assert (job["total"], job["done"], job["failed"]) == (5, 4, 1)
    items = {item["image_path"]: item for item in all_results(api, job["id"])}
    assert set(items) == {"broken.png", *(f"sub/f_{i}.png" for i in range(4))}
    assert items["broken.png"]["status"] == "failed"
    assert "not an image" in items["broken.png"]["error"]
    assert_seed_shape([item for path, item in items.items() if path != "broken.png"])


def test_the_api_served_as_compose_serves_it_stores_uploads_in_s3(
    tmp_path: Path, redis_url: str, model_store: ModelStore, moto_server: MotoServer
) -> None:
    """gunicorn's gevent workers (compose's command) with s3:// storage, as compose runs it.

    s3fs runs its calls on an asyncio loop; under gevent's patching that loop used to live in
    a greenlet of the worker's thread and every upload answered 400 ("Calling sync() from
    within a running loop"). Concurrent uploads must all be stored while health checks answer.
    """
    uploads = moto_server.create_bucket(f"uploads-{uuid.uuid4().hex[:8]}")
    database_url = f"sqlite:///{tmp_path / 'jobs.db'}"
    upgrade(database_url)
    (tmp_path / "data").mkdir()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EMOTIONS_")}
    env.update(moto_server.env())
    env.update(
        {
            # By name, as compose's http://minio:9000: a DNS lookup on s3fs's event loop.
            "EMOTIONS_S3_ENDPOINT_URL": moto_server.endpoint_url.replace("127.0.0.1", "localhost"),
            "EMOTIONS_API_BIND": f"127.0.0.1:{port}",
            "EMOTIONS_DATABASE_URL": database_url,
            "EMOTIONS_BROKER_URL": redis_url,
            "EMOTIONS_VAR_DIR": str(model_store.var_dir),
            "EMOTIONS_DATA_ROOT": str(tmp_path / "data"),
            "EMOTIONS_MLFLOW_TRACKING_URI": model_store.tracking_uri,
            "EMOTIONS_STORAGE_URL": f"s3://{uploads}/shared",
            "EMOTIONS_AUTH": "disabled",
        }
    )
    launcher = Launcher(env, tmp_path, cwd=ROOT, append_logs=False)
    process = launcher.start(
        "api",
        compose_api_command(),
        lambda *_: http_ready(url + "/healthz"),
        log_path=tmp_path / "api.log",
    )
    try:
        process.wait_ready(60)

        def submit(n: int) -> requests.Response:
            archive = make_zip([(f"z_{i}.png", face_png(n * 100 + i)) for i in range(12)])
            return requests.post(
                f"{url}/api/v1/jobs", files={"files": ("faces.zip", archive)}, timeout=60
            )

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(submit, range(4)))
            health = requests.get(f"{url}/healthz", timeout=10)
        assert health.status_code == 200
        for answer in answers:
            assert answer.status_code == 202, answer.text
            job_id = answer.json()["id"]
            keys = moto_server.keys(uploads, f"shared/jobs/{job_id}/")
            assert len(keys) == 12, keys
        files = [("files", (f"f_{i}.png", face_png(900 + i))) for i in range(3)]
        answer = requests.post(f"{url}/api/v1/jobs", files=files, timeout=60)
        assert answer.status_code == 202, answer.text
        assert len(moto_server.keys(uploads, f"shared/jobs/{answer.json()['id']}/")) == 3
    finally:
        process.stop(15)
