"""A real Celery worker never follows a link swapped into the data root after submission.

The unit tests (tests/unit/test_confined_reads.py) drive the worker's chunk code in-process;
this one runs it as deployed: the worker builds its read roots from its own environment.
"""

from __future__ import annotations

import shutil

import pytest

from face_emotions.data.confined_files import LINK_REFUSED
from tests.integration.conftest import wait_for_job
from tests.integration.test_batch_jobs import face_png

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_worker_refuses_links_swapped_in_after_submission(
    services, api, start_worker, tmp_path
) -> None:
    photos = services.data_root / "photos"
    (photos / "sub").mkdir(parents=True)
    for name in ("keep.png", "swapped.png", "sub/face.png"):
        (photos / name).write_bytes(face_png(1))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "face.png").write_bytes(face_png(2))
    response = api.post("/api/v1/jobs", json={"folder": "photos", "recursive": True})
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]

    # Before any worker runs: one file, and one folder, become links leading out.
    (photos / "swapped.png").unlink()
    (photos / "swapped.png").symlink_to(outside / "face.png")
    shutil.rmtree(photos / "sub")
    (photos / "sub").symlink_to(outside, target_is_directory=True)

    start_worker()
    job = wait_for_job(api, job_id)
    assert (job["status"], job["done"], job["failed"]) == ("completed_with_errors", 1, 2), job
    items = api.get(f"/api/v1/jobs/{job_id}/results").get_json()["items"]
    by_name = {item["image_path"]: item for item in items}
    assert by_name["keep.png"]["status"] == "succeeded"
    for name in ("swapped.png", "sub/face.png"):
        assert (by_name[name]["status"], by_name[name]["error"]) == ("failed", LINK_REFUSED)
        thumbnail = api.get(f"/api/v1/jobs/{job_id}/images/{by_name[name]['image_id']}/thumbnail")
        assert thumbnail.status_code == 403
        assert thumbnail.get_json()["error"]["code"] == "outside_data_root"
        assert str(outside) not in thumbnail.get_data(as_text=True)
