"""Storage for more than one host: the API stores uploads in S3, a worker process reads them.

The API (Flask test client) and a real Celery worker share nothing but the database, the
broker and an S3-compatible server (``moto_server``, a separate process): the worker could be
on another host. Folder jobs read an ``s3://`` data root the same way.
"""

from __future__ import annotations

import io
import uuid

import pytest

from face_emotions.settings import Settings
from tests.integration.conftest import Services
from tests.integration.conftest import wait_for_job
from tests.integration.test_batch_jobs import all_results
from tests.integration.test_batch_jobs import assert_seed_shape
from tests.integration.test_batch_jobs import face_png
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
