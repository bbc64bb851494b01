"""Thumbnails cost an API worker one reduced decode per image, then nothing.

Without timing anything: a spy on Pillow counts the images opened and records the size each
was decoded at. The second request for a thumbnail opens no image at all (it is served from the
upload storage), a 6000 x 6000 JPEG is decoded at 1/8 scale, and an image that would still
decode more than ``EMOTIONS_THUMBNAIL_MAX_PIXELS`` pixels is refused before its pixels are.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from flask.testing import FlaskClient
from PIL import Image as PILImage
from PIL import ImageFile
from werkzeug.test import TestResponse

from api import create_app
from face_emotions.settings import Settings
from tests.fakes import ChunkOnlyBroker
from tests.fakes import FakeRegistry
from tests.unit.test_api import api_settings
from tests.unit.test_api import assert_error
from tests.unit.test_api import authed_client
from tests.unit.test_api import job_images
from tests.unit.test_api import storage_dir


class DecodeSpy:
    """Counts ``Image.open`` calls and records the size of every image whose pixels load."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.opened = 0
        self.loaded: list[tuple[int, int]] = []
        real_open, real_load = PILImage.open, ImageFile.ImageFile.load

        def spy_open(*args, **kwargs):
            self.opened += 1
            return real_open(*args, **kwargs)

        def spy_load(image):
            # The first load of an image decodes its pixels (later ones are no-ops); images
            # are held here so that no id is reused while the spy runs.
            if id(image) not in decoded:
                decoded[id(image)] = image
                self.loaded.append(image.size)
            return real_load(image)

        decoded: dict[int, ImageFile.ImageFile] = {}

        monkeypatch.setattr(PILImage, "open", spy_open)
        monkeypatch.setattr(ImageFile.ImageFile, "load", spy_load)

    def reset(self) -> None:
        self.opened, self.loaded = 0, []


def encoded(size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", size, (30, 120, 200)).save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return api_settings(tmp_path, thumbnail_max_pixels=1_000_000)


@pytest.fixture
def client(settings: Settings) -> FlaskClient:
    registry = FakeRegistry([], None)
    app = create_app(settings, broker=ChunkOnlyBroker(), registry_factory=lambda: registry)
    return authed_client(app)


def folder_job(client: FlaskClient, settings: Settings, files: dict[str, bytes]) -> list[str]:
    """Submit ``files`` as a folder job; the thumbnail URL of each, in name order."""
    folder = settings.resolved_data_root / "photos"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    response = client.post("/api/v1/jobs", json={"folder": "photos"})
    assert response.status_code == 202, response.get_json()
    job_id = response.get_json()["id"]
    images = job_images(client.application, job_id)
    return [f"/api/v1/jobs/{job_id}/images/{image.id}/thumbnail" for image in images]


def first_thumbnail(
    client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, name: str, size: tuple
) -> tuple[str, DecodeSpy, TestResponse]:
    """A one-image folder job's thumbnail URL, the decode spy, and the first response."""
    fmt = "PNG" if name.endswith(".png") else "JPEG"
    [url] = folder_job(client, settings, {name: encoded(size, fmt)})
    spy = DecodeSpy(monkeypatch)
    return url, spy, client.get(url)


def test_second_request_is_served_without_decoding(
    client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, spy, first = first_thumbnail(client, settings, monkeypatch, "wide.png", (600, 300))
    assert first.status_code == 200 and first.mimetype == "image/jpeg"
    assert spy.opened == 1 and spy.loaded == [(600, 300)]

    spy.reset()
    second = client.get(url)
    assert second.status_code == 200 and second.get_data() == first.get_data()
    assert (spy.opened, spy.loaded) == (0, [])  # neither the image nor the thumbnail decoded
    assert second.headers["Cache-Control"] == "no-store"  # the API's headers are kept
    *_, job_id, _, image_id, _ = url.split("/")
    kept = storage_dir(settings) / "thumbnails" / job_id / f"{image_id}-256.jpg"
    assert kept.read_bytes() == first.get_data()

    # A copy cut short (a crash while writing) is not served: rendered and kept again.
    kept.write_bytes(first.get_data()[:100])
    third = client.get(url)
    assert third.get_data() == first.get_data() and kept.read_bytes() == first.get_data()


def test_large_jpeg_is_decoded_at_reduced_scale(
    client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, spy, response = first_thumbnail(client, settings, monkeypatch, "huge.jpg", (6000, 6000))
    assert response.status_code == 200, response.get_data()[:200]
    assert spy.loaded == [(750, 750)]  # 1/8 scale: 36 M pixels never decoded
    with PILImage.open(io.BytesIO(response.get_data())) as thumb:
        assert thumb.size == (256, 256)


def test_images_over_the_thumbnail_budget_are_refused(
    client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 1,000,000 pixels allowed: a 1200 x 1200 PNG has no reduced decoding, a JPEG does.
    png_url, jpeg_url = folder_job(
        client,
        settings,
        {"a.png": encoded((1200, 1200), "PNG"), "b.jpg": encoded((1200, 1200), "JPEG")},
    )
    spy = DecodeSpy(monkeypatch)
    refused = client.get(png_url)
    assert (refused.status_code, refused.mimetype) == (422, "application/json")
    error = assert_error(refused, 422, "image_too_large")
    assert "1200 x 1200" in error["message"] and "EMOTIONS_THUMBNAIL_MAX_PIXELS" in error["message"]
    assert spy.loaded == []  # refused from its header, before any pixel was decoded
    assert client.get(jpeg_url).status_code == 200
    assert spy.loaded == [(600, 600)]
