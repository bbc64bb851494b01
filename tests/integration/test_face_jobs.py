"""Jobs of real photographs through the REST API and a real worker: one prediction per face.

The worker is started as compose starts it, with the deployment's default face policy (every
face); the README's upload request carries the files. Awkward images (1x1, a 20,000-pixel
panorama strip, one colour, PNG with alpha) each get a prediction, never a failed chunk.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from face_emotions.data.images import decode_image
from tests.integration.conftest import wait_for_job
from tests.integration.test_batch_jobs import all_results
from tests.integration.test_batch_jobs import assert_seed_shape
from tests.real_photos import ASTRONAUT_FACE
from tests.real_photos import GROUP_FACES
from tests.real_photos import assert_same_faces
from tests.real_photos import group_photo
from tests.real_photos import skimage_photo

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _awkward() -> dict[str, bytes]:
    rgba = decode_image(skimage_photo("astronaut.png")).convert("RGBA")
    alpha = np.zeros(rgba.size[::-1], dtype=np.uint8)
    alpha[40:220, 150:300] = 255
    rgba.putalpha(Image.fromarray(alpha))
    return {
        "tiny.png": _png(Image.new("RGB", (1, 1), "white")),
        "strip.png": _png(Image.new("RGB", (20000, 30), (30, 90, 200))),
        "grey.png": _png(Image.new("RGB", (640, 480), (128, 128, 128))),
        "alpha.png": _png(rgba),
    }


def _upload(api, files: dict[str, bytes], **fields: str) -> str:
    data = {"files": [(io.BytesIO(body), name) for name, body in files.items()], **fields}
    response = api.post("/api/v1/jobs", data=data, content_type="multipart/form-data")
    assert response.status_code == 202, response.get_json()
    return response.get_json()["id"]


@pytest.mark.parametrize("services", ["postgresql"], indirect=True)
def test_every_face_of_real_photos_through_the_api(services, api, start_worker) -> None:
    start_worker()
    photos = {
        "group.jpg": group_photo().read_bytes(),
        "astronaut.png": skimage_photo("astronaut.png").read_bytes(),
        "coffee.png": skimage_photo("coffee.png").read_bytes(),
        **_awkward(),
    }
    job_id = _upload(api, photos)
    job = wait_for_job(api, job_id, timeout=180)
    assert job["status"] == "succeeded", job  # every image classified, none failed
    assert job["face_policy"] == "all"

    items = {item["image_path"]: item for item in all_results(api, job_id)}
    assert_seed_shape(list(items.values()))
    group = items["group.jpg"]
    assert group["faces_found"] == 6 and group["image_size"] == [1280, 886]
    assert_same_faces([face["box"] for face in group["faces"]], GROUP_FACES)
    for face in group["faces"]:
        assert face["score"] >= 0.95 and len(face["landmarks"]) == 5
        assert sum(face["all_probabilities"].values()) == pytest.approx(1.0, abs=2e-3)
    assert group["predicted_emotion"] == group["faces"][0]["predicted_emotion"]
    assert_same_faces([face["box"] for face in items["astronaut.png"]["faces"]], [ASTRONAUT_FACE])
    assert items["alpha.png"]["faces_found"] == 1
    for name in ("coffee.png", "tiny.png", "strip.png", "grey.png"):
        assert items[name]["faces_found"] == 0, name  # no face: the whole image, and it says so
        assert items[name]["faces"][0]["whole_image"]

    url = f"/api/v1/jobs/{job_id}/results"
    rows = list(csv.DictReader(io.StringIO(api.get(f"{url}?format=csv").get_data(as_text=True))))
    group_rows = [row for row in rows if row["image_path"] == "group.jpg"]
    assert [row["face_index"] for row in group_rows] == [str(i) for i in range(6)]
    assert len(rows) == 6 + 1 + 1 + 4  # a row per face, a row per image without one
    boxes = [[float(row[f"box_{k}"]) for k in ("x0", "y0", "x1", "y1")] for row in group_rows]
    assert_same_faces(boxes, GROUP_FACES)

    summary = api.get(f"/api/v1/jobs/{job_id}/summary").get_json()
    assert summary["faces"] == {
        "faces": 8,
        "images_without_face": 4,
        "images_with_several_faces": 1,
        "not_searched": 0,
    }
    only_no_face = api.get(f"{url}?no_face=true").get_json()
    assert only_no_face["total"] == 4


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_a_job_can_ask_for_the_largest_face_or_no_detection(services, api, start_worker) -> None:
    start_worker()
    group = {"group.jpg": group_photo().read_bytes()}
    largest_id = _upload(api, group, faces="largest")
    whole_id = _upload(api, group, faces="none")
    assert wait_for_job(api, largest_id)["face_policy"] == "largest"
    assert wait_for_job(api, whole_id)["face_policy"] == "none"
    [largest] = all_results(api, largest_id)
    assert largest["faces_found"] == 6 and len(largest["faces"]) == 1
    [whole] = all_results(api, whole_id)
    assert whole["faces_found"] is None and whole["faces"][0]["whole_image"]
    bad = api.post("/api/v1/jobs", data={"files": [(io.BytesIO(b"x"), "a.png")], "faces": "some"})
    assert bad.status_code == 400
