"""Reads of stored images stay inside the data root at open time, not only at submission.

A folder job is checked when it is submitted; whoever can write into the shared data tree may
then swap an image, or one of its folders, for a symbolic link to a file outside the root. The
worker's read path (``classify_chunk`` with the loader the Celery task uses) and the thumbnail
route must refuse it without ever reading the outside file, and say so without naming it.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
from flask.testing import FlaskClient
from PIL import Image as PILImage

from api import create_app
from api.extensions import services
from face_emotions.data.confined_files import LINK_REFUSED
from face_emotions.data.confined_files import OUTSIDE_REFUSED
from face_emotions.faces.crop import CropSpec
from face_emotions.serving.chunk_classifier import classify_chunk
from face_emotions.serving.image_loading import load_stored_image
from face_emotions.serving.image_loading import local_read_roots
from face_emotions.serving.image_loading import storage_image_loader
from face_emotions.serving.model_holder import ModelHolder
from face_emotions.serving.model_holder import ServingModel
from face_emotions.settings import Settings
from tests.fakes import ChunkOnlyBroker
from tests.fakes import FakeRegistry
from tests.unit.test_api import api_settings
from tests.unit.test_api import assert_error
from tests.unit.test_api import authed_client

INSIDE = (0, 0, 255)
OUTSIDE = (255, 0, 0)


def write_png(path: Path, colour: tuple[int, int, int]) -> None:
    buffer = io.BytesIO()
    PILImage.new("RGB", (16, 16), colour).save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())


class RecordingHolder:
    """Serves version 1 with a predictor that remembers the colour of every image it saw."""

    serving_version = 1

    def __init__(self) -> None:
        self.seen: list[tuple[int, ...]] = []

    def for_job(self, pinned: int | None) -> ServingModel:
        return ServingModel(1, self)  # type: ignore[arg-type]

    def describe(self) -> dict:
        return {"version": 1, "device": "cpu", "backend": "torch"}

    backend = "torch"
    spec = SimpleNamespace(crop=CropSpec())

    def predict_images(self, images: list[PILImage.Image]) -> list[list[float]]:
        self.seen.extend(tuple(np.asarray(image.convert("RGB"))[0, 0].tolist()) for image in images)
        return [[0.1, 0.1, 0.6, 0.1, 0.1] for _ in images]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return api_settings(tmp_path, decode_threads=1)


@pytest.fixture
def queue() -> ChunkOnlyBroker:
    return ChunkOnlyBroker()


@pytest.fixture
def app(settings: Settings, queue: ChunkOnlyBroker):
    return create_app(settings, broker=queue, registry_factory=lambda: FakeRegistry([], None))


@pytest.fixture
def client(app) -> FlaskClient:
    return authed_client(app)


@pytest.mark.parametrize("swap", ["file", "folder"])
def test_links_swapped_in_after_submission_are_never_read(
    app, client: FlaskClient, settings: Settings, queue: ChunkOnlyBroker, tmp_path: Path, swap
) -> None:
    photos = settings.resolved_data_root / "photos"
    (photos / "sub").mkdir(parents=True)
    write_png(photos / "keep.png", INSIDE)
    write_png(photos / "sub" / "face.png", INSIDE)
    outside = tmp_path / "outside"
    outside.mkdir()
    write_png(outside / "face.png", OUTSIDE)
    response = client.post("/api/v1/jobs", json={"folder": "photos", "recursive": True})
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]

    # After submission: the image, or the folder holding it, becomes a link leading out.
    if swap == "file":
        (photos / "sub" / "face.png").unlink()
        (photos / "sub" / "face.png").symlink_to(outside / "face.png")
    else:
        shutil.rmtree(photos / "sub")
        (photos / "sub").symlink_to(outside, target_is_directory=True)

    # The worker's read path, with the loader a worker builds from its settings.
    holder = RecordingHolder()
    [(_, image_ids)] = queue.chunks
    with app.app_context():
        sessions = services().sessions
    outcome = classify_chunk(
        sessions, cast(ModelHolder, holder), uuid.UUID(job_id), image_ids, settings=settings
    )
    assert (outcome.succeeded, outcome.failed) == (1, 1)
    assert holder.seen == [INSIDE]  # the outside image never reached the model

    items = client.get(f"/api/v1/jobs/{job_id}/results").get_json()["items"]
    by_name = {item["image_path"]: item for item in items}
    assert by_name["keep.png"]["status"] == "succeeded"
    refused = by_name["sub/face.png"]
    assert refused["status"] == "failed"
    assert refused["error"] == LINK_REFUSED
    assert str(outside) not in refused["error"]
    assert client.get(f"/api/v1/jobs/{job_id}").get_json()["status"] == "completed_with_errors"

    # The thumbnail route refuses it too, in JSON; the image left alone is still shown.
    url = f"/api/v1/jobs/{job_id}/images/{{}}/thumbnail"
    response = client.get(url.format(refused["image_id"]))
    assert (response.status_code, response.mimetype) == (403, "application/json")
    error = assert_error(response, 403, "outside_data_root")
    assert "symbolic link" in error["message"] and str(tmp_path) not in error["message"]
    kept = client.get(url.format(by_name["keep.png"]["image_id"]))
    assert kept.status_code == 200 and kept.mimetype == "image/jpeg"
    with PILImage.open(io.BytesIO(kept.get_data())) as thumb:
        red, _, blue = np.asarray(thumb.convert("RGB"))[0, 0].tolist()
        assert blue > 200 and red < 50


def test_loader_reads_only_regular_files_below_its_roots(settings: Settings, tmp_path) -> None:
    root = settings.resolved_data_root
    write_png(root / "a.png", INSIDE)
    write_png(tmp_path / "elsewhere.png", OUTSIDE)
    os.mkfifo(root / "pipe.png")  # opening a FIFO for reading would block without O_NONBLOCK
    load = storage_image_loader(settings)
    assert local_read_roots(settings) == (root, settings.var_dir / "storage")
    assert isinstance(load(str(root / "a.png"), 10_000), PILImage.Image)
    assert isinstance(load(f"file://{root}/a.png", 10_000), PILImage.Image)
    assert load(str(tmp_path / "elsewhere.png"), 10_000) == OUTSIDE_REFUSED
    assert load(str(root / "pipe.png"), 10_000) == "cannot read file: not a regular file"
    assert load(str(root / "missing.png"), 10_000) == "file not found"
    assert load(str(root / "a.png" / "x.png"), 10_000) == "file not found"
    assert load(str(root), 10_000) == OUTSIDE_REFUSED  # the root itself is no image
    (root / "dir.png").mkdir()
    assert load(str(root / "dir.png"), 10_000) == "is a directory, not a file"
    # Library callers that pass no roots keep the plain read.
    assert isinstance(load_stored_image(str(tmp_path / "elsewhere.png"), 10_000), PILImage.Image)
