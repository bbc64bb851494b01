"""The REST API against a temporary SQLite database, a fake queue and a fake registry.

Authentication stays on: the ``client`` fixture sends the bootstrap admin token on every
request (roles, owners and refusals are tested in test_auth.py).
"""

from __future__ import annotations

import csv
import io
import json
import re
import threading
import uuid
import zipfile
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from PIL import Image as PILImage
from sqlalchemy import select
from werkzeug.datastructures import FileStorage

from api import create_app
from api.extensions import services
from api.jobs import BROKER_WARNING
from face_emotions.data.storage import local_path
from face_emotions.faces.crop import CropSpec
from face_emotions.faces.detection import Face
from face_emotions.jobs import job_queries
from face_emotions.jobs import result_writes
from face_emotions.jobs import worker_heartbeats
from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Job
from face_emotions.labels import EMOTIONS
from face_emotions.registry.mlflow_registry import VersionInfo
from face_emotions.serving.face_regions import classify_regions
from face_emotions.settings import Settings
from tests.contract import CSV_HEADER
from tests.contract import FACE_KEYS
from tests.contract import SEED_KEYS
from tests.fakes import ChunkOnlyBroker as FakeQueue


class FakeClient:
    def __init__(self) -> None:
        self.up = True

    def search_registered_models(self, max_results: int = 100) -> list[Any]:
        if not self.up:
            raise ConnectionError("registry down")
        return []


class FakeRegistry:
    model_name = "face-emotion"

    def __init__(self, versions: list[VersionInfo]) -> None:
        self.versions = versions
        self.client = FakeClient()
        self.up = True

    def list_versions(self) -> list[VersionInfo]:
        if not self.up:
            raise ConnectionError("registry down")
        return self.versions


def version(number: int, aliases: tuple[str, ...] = (), **tags: str) -> VersionInfo:
    return VersionInfo(
        name="face-emotion",
        version=number,
        source=f"file:///artifacts/{number}/model",
        run_id=f"run{number}",
        tags=tags,
        aliases=aliases,
        created_ms=1_700_000_000_000 + number,
    )


ADMIN_TOKEN = "test-admin-token-0123456789"


def api_settings(tmp_path: Path, **overrides) -> Settings:
    """Settings of an API under test: files under ``tmp_path``, tiny chunks, no broker."""
    (tmp_path / "data").mkdir()
    values = {
        "var_dir": tmp_path / "var",
        "data_root": tmp_path / "data",
        "batch_size": 2,
        "chunk_batches": 1,
        "admin_token": ADMIN_TOKEN,
        "broker_url": "memory://",
        **overrides,
    }
    return Settings(**values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return api_settings(tmp_path, max_upload_mb=1)


def authed_client(app) -> FlaskClient:
    """A test client that sends the bootstrap admin token with every request."""
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_TOKEN}"
    return client


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry(
        [
            version(
                2,
                ("champion",),
                architecture="efficientnet_lite0",
                image_size="224",
                accuracy="0.93",
                weighted_f1="0.92",
                macro_f1="0.91",
            ),
            version(1, architecture="cnn", image_size="oops"),
        ]
    )


@pytest.fixture
def app(settings: Settings, queue: FakeQueue, registry: FakeRegistry):
    return create_app(settings, broker=queue, registry_factory=lambda: registry)


@pytest.fixture
def client(app) -> FlaskClient:
    return authed_client(app)


def png(color: tuple[int, int, int] = (200, 10, 10)) -> bytes:
    buffer = io.BytesIO()
    PILImage.new("RGB", (8, 8), color).save(buffer, format="PNG")
    return buffer.getvalue()


def upload(client: FlaskClient, names: list[str], headers=None, **fields: str):
    data: dict[str, Any] = {
        "files": [(io.BytesIO(png((i * 40, 0, 0))), n) for i, n in enumerate(names)]
    }
    data.update(fields)
    return client.post(
        "/api/v1/jobs", data=data, content_type="multipart/form-data", headers=headers or {}
    )


def storage_dir(settings: Settings) -> Path:
    """The local directory behind the default ``file://`` storage URL."""
    path = local_path(settings.resolved_storage_url)
    assert path is not None
    return Path(path)


def stored_files(settings: Settings) -> list[Path]:
    root = storage_dir(settings) / "jobs"
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def job_images(app, job_id: str) -> list[Image]:
    with app.app_context(), services().sessions() as session:
        return list(
            session.scalars(
                select(Image).where(Image.job_id == uuid.UUID(job_id)).order_by(Image.position)
            )
        )


def count_jobs(app) -> int:
    with app.app_context(), services().sessions() as session:
        return len(session.scalars(select(Job)).all())


def assert_error(response, status: int, code: str | None = None) -> dict[str, str]:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"code", "message"}
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code
    return body["error"]


# -- submission ------------------------------------------------------------------------------


def test_upload_job_is_stored_committed_and_chunked(
    app, client: FlaskClient, settings: Settings, queue: FakeQueue
) -> None:
    names = [f"face{i}.png" for i in range(5)]
    response = upload(client, names, batch_size="2")
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert response.headers["Location"] == f"/api/v1/jobs/{body['id']}"
    assert body["status"] == "queued"
    assert (body["source_type"], body["source"], body["total"]) == ("upload", "5 files", 5)
    assert (body["batch_size"], body["model_version"], body["progress"]) == (2, None, 0.0)
    assert body["links"]["self"] == f"/api/v1/jobs/{body['id']}"
    assert "warning" not in body

    job_dir = storage_dir(settings) / "jobs" / body["id"]
    assert sorted(p.name for p in job_dir.iterdir()) == names
    images = job_images(app, body["id"])
    assert [image.path for image in images] == names
    assert all(image.location == f"file://{job_dir / image.path}" for image in images)
    ids = [image.id for image in images]
    assert queue.chunks == [
        (body["id"], ids[0:2]),
        (body["id"], ids[2:4]),
        (body["id"], ids[4:5]),
    ]


def test_default_batch_size_and_pinned_model(client: FlaskClient, settings: Settings) -> None:
    response = upload(client, ["a.png"], model_version="3")
    assert response.status_code == 202
    body = response.get_json()
    assert (body["batch_size"], body["model_version"], body["source"]) == (2, 3, "1 file")


def test_zip_job(app, client: FlaskClient, queue: FakeQueue) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name in ("happy/a.png", "sad/b.png", "c.png"):
            archive.writestr(name, png())
        archive.writestr("readme.txt", "hello")
        archive.writestr("__MACOSX/._c.png", "meta")
    buffer.seek(0)
    response = client.post(
        "/api/v1/jobs",
        data={"files": [(buffer, "faces.zip")], "batch_size": "3"},
        content_type="multipart/form-data",
    )
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert (body["source_type"], body["source"], body["total"], body["skipped"]) == (
        "zip",
        "faces.zip",
        3,
        2,
    )
    assert [image.path for image in job_images(app, body["id"])] == [
        "happy/a.png",
        "sad/b.png",
        "c.png",
    ]
    assert [len(ids) for _, ids in queue.chunks] == [3]  # chunk = batch_size * chunk_batches
    # The answer says what was skipped, not only how many.
    assert sorted(body["skipped_files"]) == ["__MACOSX/._c.png", "readme.txt"]


def test_uploads_keep_their_folders(app, client: FlaskClient) -> None:
    """``face-emotions submit ./faces`` sends Angry/0.jpg and Fear/0.jpg: both names must
    survive (before, they became 0.jpg and "0 (1).jpg" and results could not be matched)."""
    response = upload(client, ["Angry/0.png", "Fear/0.png", "../../etc/x.png"])
    assert response.status_code == 202, response.get_json()
    paths = [image.path for image in job_images(app, response.get_json()["id"])]
    assert paths == ["Angry/0.png", "Fear/0.png", "etc/x.png"]


def test_jobs_are_found_by_the_short_id_the_console_shows(client: FlaskClient) -> None:
    first = upload(client, ["a.png"]).get_json()["id"]
    second = upload(client, ["b.png"]).get_json()["id"]
    for job_id in (first, second):
        for prefix in (job_id[:8], job_id[:8].upper(), job_id[:13]):
            found = client.get("/api/v1/jobs", query_string={"id_prefix": prefix}).get_json()
            assert [item["id"] for item in found["items"]] == [job_id], prefix
    assert client.get("/api/v1/jobs", query_string={"id_prefix": "zz"}).status_code == 400


def test_folder_job(app, client: FlaskClient, settings: Settings, queue: FakeQueue) -> None:
    folder = settings.resolved_data_root / "batch" / "happy"
    folder.mkdir(parents=True)
    for name in ("a.png", "b.png", "c.png"):
        (folder / name).write_bytes(png())
    (settings.resolved_data_root / "batch" / "top.png").write_bytes(png())
    response = client.post(
        "/api/v1/jobs", json={"folder": "batch", "recursive": True, "batch_size": 4}
    )
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert (body["source_type"], body["source"], body["total"]) == ("folder", "batch", 4)
    images = job_images(app, body["id"])
    assert [image.path for image in images] == [
        "happy/a.png",
        "happy/b.png",
        "happy/c.png",
        "top.png",
    ]
    assert Path(images[0].location) == folder / "a.png"
    assert stored_files(settings) == []  # folder jobs copy nothing
    assert [len(ids) for _, ids in queue.chunks] == [4]

    flat = client.post("/api/v1/jobs", json={"folder": "batch", "recursive": False})
    assert flat.get_json()["total"] == 1


def test_idempotency_key_returns_the_same_job(
    app, client: FlaskClient, settings: Settings, queue: FakeQueue
) -> None:
    headers = {"Idempotency-Key": "retry-me-123"}
    first = upload(client, ["a.png", "b.png"], headers=headers)
    assert first.status_code == 202
    calls, files = list(queue.chunks), stored_files(settings)

    second = upload(client, ["x.png", "y.png", "z.png"], headers=headers)
    assert second.status_code == 200
    assert second.get_json()["id"] == first.get_json()["id"]
    assert second.get_json()["total"] == 2
    assert second.headers["Location"] == first.headers["Location"]
    assert queue.chunks == calls  # nothing enqueued again
    assert stored_files(settings) == files  # nothing stored again
    assert count_jobs(app) == 1

    other = upload(client, ["a.png"], headers={"Idempotency-Key": "another"})
    assert other.status_code == 202
    assert other.get_json()["id"] != first.get_json()["id"]
    assert_error(
        upload(client, ["a.png"], headers={"Idempotency-Key": "k" * 256}),
        400,
        "invalid_idempotency_key",
    )


def test_idempotency_race_returns_the_winner_and_removes_files(
    app,
    client: FlaskClient,
    settings: Settings,
    queue: FakeQueue,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two requests with one key both pass the lookup; the unique constraint decides."""
    headers = {"Idempotency-Key": "racy"}
    first = upload(client, ["a.png"], headers=headers)
    files, calls = stored_files(settings), list(queue.chunks)
    real_lookup = job_queries.find_by_idempotency_key
    lookups: list[str] = []

    def late_lookup(session, owner: str, key: str):
        lookups.append(key)
        return None if len(lookups) == 1 else real_lookup(session, owner, key)

    monkeypatch.setattr(job_queries, "find_by_idempotency_key", late_lookup)
    second = upload(client, ["b.png", "c.png"], headers=headers)
    assert second.status_code == 200, second.get_json()
    assert second.get_json()["id"] == first.get_json()["id"]
    assert len(lookups) == 2
    assert stored_files(settings) == files
    assert queue.chunks == calls
    assert count_jobs(app) == 1


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "mentions"),
    [
        (
            {"data": {"batch_size": "2"}, "content_type": "multipart/form-data"},
            400,
            "no_files",
            "files",
        ),
        (
            {"data": {"files": [(io.BytesIO(b"hi"), "notes.txt")]}},
            400,
            "unsupported_file",
            "notes.txt",
        ),
        (
            {"data": {"files": [(io.BytesIO(b"x"), "a.zip"), (io.BytesIO(b"x"), "b.png")]}},
            400,
            "unsupported_file",
            ".zip",
        ),
        (
            {"data": {"files": [(io.BytesIO(b"not a zip"), "a.zip")]}},
            400,
            "invalid_zip",
            "zip",
        ),
        (
            {"data": {"files": [(io.BytesIO(b"x"), "a.png")], "batch_size": "abc"}},
            400,
            "validation_error",
            "batch_size",
        ),
        (
            {"data": {"files": [(io.BytesIO(b"x"), "a.png")], "batch_size": "0"}},
            400,
            "validation_error",
            "batch_size",
        ),
        (
            {"data": {"files": [(io.BytesIO(b"x"), "a.png")], "batch_size": "1025"}},
            400,
            "validation_error",
            "batch_size",
        ),
        (
            {"data": {"files": [(io.BytesIO(b"x"), "a.png")], "model_version": "0"}},
            400,
            "validation_error",
            "model_version",
        ),
        ({"json": {"folder": "/etc"}}, 400, "invalid_path", "/etc"),
        ({"json": {"folder": "../outside"}}, 400, "invalid_path", ".."),
        ({"json": {"folder": "ok/../../x"}}, 400, "invalid_path", ".."),
        ({"json": {"folder": "missing"}}, 400, "not_found", "missing"),
        ({"json": {"recursive": True}}, 400, "validation_error", "folder"),
        ({"json": {"folder": "x", "batch_size": 0}}, 400, "validation_error", "batch_size"),
        ({"json": {"folder": "x", "bogus": 1}}, 400, "validation_error", "bogus"),
        ({"json": ["folder"]}, 400, "invalid_json", "JSON"),
        (
            {"data": "{not json", "content_type": "application/json"},
            400,
            "invalid_json",
            "JSON",
        ),
        ({"data": "hello", "content_type": "text/plain"}, 415, "unsupported_media_type", None),
    ],
    ids=[
        "no-files",
        "txt-upload",
        "zip-with-others",
        "bad-zip",
        "batch-size-abc",
        "batch-size-0",
        "batch-size-too-big",
        "model-version-0",
        "absolute-folder",
        "dotdot-folder",
        "nested-dotdot",
        "missing-folder",
        "json-without-folder",
        "json-batch-size-0",
        "json-unknown-field",
        "json-not-object",
        "malformed-json",
        "plain-text",
    ],
)
def test_invalid_submissions(
    app,
    client: FlaskClient,
    settings: Settings,
    queue: FakeQueue,
    kwargs: dict[str, Any],
    status: int,
    code: str,
    mentions: str | None,
) -> None:
    kwargs = dict(kwargs)
    if "data" in kwargs and isinstance(kwargs["data"], dict):
        kwargs.setdefault("content_type", "multipart/form-data")
    error = assert_error(client.post("/api/v1/jobs", **kwargs), status, code)
    if mentions is not None:
        assert mentions in error["message"]
    assert count_jobs(app) == 0
    assert stored_files(settings) == []
    assert queue.chunks == []


def test_folder_symlink_escape_is_refused(
    client: FlaskClient, settings: Settings, tmp_path
) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "x.png").write_bytes(png())
    (settings.resolved_data_root / "escape").symlink_to(secret, target_is_directory=True)
    assert_error(client.post("/api/v1/jobs", json={"folder": "escape"}), 400, "invalid_path")


def test_body_over_the_upload_limit_is_413(app, client: FlaskClient, settings: Settings) -> None:
    big = io.BytesIO(b"\x00" * (1024 * 1024 + 1))
    response = client.post(
        "/api/v1/jobs", data={"files": [(big, "big.png")]}, content_type="multipart/form-data"
    )
    assert_error(response, 413, "payload_too_large")
    assert stored_files(settings) == []
    assert count_jobs(app) == 0


def test_failure_before_commit_removes_stored_files(
    app, client: FlaskClient, settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Job:
        raise RuntimeError("database exploded at /secret/internal/path")

    monkeypatch.setattr(job_queries, "create_job", broken)
    error = assert_error(upload(client, ["a.png", "b.png"]), 500, "internal_error")
    assert "/secret" not in error["message"]
    assert "exploded" not in error["message"]
    assert stored_files(settings) == []
    assert not any((storage_dir(settings) / "jobs").iterdir())


def test_broker_down_keeps_the_job(
    app, client: FlaskClient, queue: FakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    queue.up = False
    response = upload(client, ["a.png", "b.png", "c.png"])
    assert response.status_code == 202
    body = response.get_json()
    assert body["warning"] == BROKER_WARNING
    assert "broker unreachable" in caplog.text
    persisted = client.get(f"/api/v1/jobs/{body['id']}")
    assert persisted.status_code == 200
    assert persisted.get_json()["status"] == "queued"
    assert persisted.get_json()["total"] == 3
    assert len(job_images(app, body["id"])) == 3


# -- reading ---------------------------------------------------------------------------------


def simulate_worker(app, job_id: str) -> list[int]:
    """Write results as a worker would: 4 images succeed (v3), the last one fails.

    img0 has one face, img1 two (Happy the larger, Sad), on img2 no face was found (classified
    whole), img3 was classified without detection (policy none).
    """
    images = job_images(app, job_id)
    probabilities = iter(
        [
            [0.1234567, 0.1, 0.5765433, 0.1, 0.1],  # img0's face: Happy
            [0.05, 0.05, 0.8, 0.05, 0.05],  # img1's larger face: Happy
            [0.05, 0.05, 0.1, 0.75, 0.05],  # img1's other face: Sad
            [0.7, 0.1, 0.1, 0.05, 0.05],  # img2, whole: Angry
            [0.1, 0.1, 0.1, 0.1, 0.6],  # img3, whole: Surprised
        ]
    )

    def predict(crops):
        return [next(probabilities) for _ in crops]

    big = Face((40.0, 20.0, 100.0, 90.0), 0.999, ((55.0, 45.0), (85.0, 45.0)))
    small = Face((130.0, 30.0, 160.0, 65.0), 0.97)
    pictures = [PILImage.new("RGB", (200, 100), "gray") for _ in range(4)]
    detected = classify_regions(
        pictures[:3], [[big], [big, small], []], policy="all", spec=CropSpec(), predict=predict
    )
    whole = classify_regions(pictures[3:], [None], policy="none", spec=CropSpec(), predict=predict)
    rows = [
        result_writes.ResultRow(
            image_id=image.id,
            probabilities=c.probabilities,
            faces=c.faces,
            faces_found=c.faces_found,
            image_size=c.size,
        )
        for image, c in zip(images[:4], [*detected, *whole], strict=True)
    ]
    rows.append(result_writes.ResultRow(image_id=images[4].id, error="not an image"))
    with app.app_context(), services().sessions() as session:
        result_writes.start_chunk(session, uuid.UUID(job_id))
        result_writes.record_results(
            session, uuid.UUID(job_id), rows, model_version=3, worker="worker-1"
        )
        session.commit()
    return [image.id for image in images]


@pytest.fixture
def finished_job(app, client: FlaskClient) -> str:
    response = upload(client, [f"img{i}.png" for i in range(5)])
    job_id = response.get_json()["id"]
    simulate_worker(app, job_id)
    return job_id


def test_job_detail_after_results(client: FlaskClient, finished_job: str) -> None:
    body = client.get(f"/api/v1/jobs/{finished_job}").get_json()
    assert body["status"] == "completed_with_errors"
    assert (body["total"], body["done"], body["failed"], body["progress"]) == (5, 4, 1, 1.0)
    assert body["model_versions"] == [3]
    assert body["started_at"] and body["finished_at"] and body["created_at"]
    assert body["duration_seconds"] is not None and body["duration_seconds"] >= 0
    assert set(body["links"]) == {"self", "results", "summary"}
    assert body["links"]["results"] == f"/api/v1/jobs/{finished_job}/results"


def test_a_waiting_status_request_answers_when_the_job_ends(app, client: FlaskClient) -> None:
    job_id = upload(client, [f"img{i}.png" for i in range(5)]).get_json()["id"]
    worker = threading.Timer(0.3, simulate_worker, args=(app, job_id))  # ends it meanwhile
    worker.start()
    try:
        body = client.get(f"/api/v1/jobs/{job_id}?wait=20").get_json()
    finally:
        worker.join()
    assert body["status"] == "completed_with_errors"
    assert (body["done"], body["failed"], body["model_versions"]) == (4, 1, [3])


def test_a_waiting_status_request_gives_the_progress_when_its_wait_is_over(
    client: FlaskClient,
) -> None:
    job_id = upload(client, ["a.png"]).get_json()["id"]
    body = client.get(f"/api/v1/jobs/{job_id}?wait=0.2").get_json()
    assert (body["status"], body["done"]) == ("queued", 0)


def test_an_ended_job_answers_a_waiting_request_at_once(
    client: FlaskClient, finished_job: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_sleeping(_seconds: float) -> None:
        raise AssertionError("waited for a job that had ended")

    monkeypatch.setattr("api.jobs.time.sleep", no_sleeping)
    body = client.get(f"/api/v1/jobs/{finished_job}?wait=30").get_json()
    assert body["status"] == "completed_with_errors"


@pytest.mark.parametrize("wait", ["-1", "30.5", "soon"])
def test_a_wait_out_of_range_is_refused(client: FlaskClient, finished_job: str, wait: str) -> None:
    response = client.get(f"/api/v1/jobs/{finished_job}?wait={wait}")
    assert_error(response, 400)


def test_results_pages_and_shape(client: FlaskClient, finished_job: str) -> None:
    url = f"/api/v1/jobs/{finished_job}/results"
    first = client.get(f"{url}?page=1&limit=2").get_json()
    assert (first["page"], first["limit"], first["total"]) == (1, 2, 5)
    assert [item["image_path"] for item in first["items"]] == ["img0.png", "img1.png"]
    item = first["items"][0]
    assert set(item) == SEED_KEYS | FACE_KEYS | {"status", "model_version", "image_id"}
    assert item["predicted_class"] == 2
    assert item["predicted_emotion"] == "Happy"
    assert item["confidence"] == 0.5765
    assert item["all_probabilities"] == {
        "Angry": 0.1235,
        "Fear": 0.1,
        "Happy": 0.5765,
        "Sad": 0.1,
        "Surprised": 0.1,
    }
    assert list(item["all_probabilities"]) == list(EMOTIONS)
    assert (item["status"], item["model_version"]) == ("succeeded", 3)
    assert (item["faces_found"], item["image_size"]) == (1, [200, 100])
    [face] = item["faces"]
    assert face == {
        "index": 0,
        "box": [40, 20, 100, 90],
        "score": 0.999,
        "landmarks": [[55.0, 45.0], [85.0, 45.0]],
        "whole_image": False,
        "predicted_class": 2,
        "predicted_emotion": "Happy",
        "confidence": 0.5765,
        "all_probabilities": item["all_probabilities"],
    }
    two = first["items"][1]
    assert two["faces_found"] == 2
    assert [f["predicted_emotion"] for f in two["faces"]] == ["Happy", "Sad"]
    assert [f["index"] for f in two["faces"]] == [0, 1]
    assert two["predicted_emotion"] == "Happy" and two["confidence"] == 0.8  # the larger face

    middle = client.get(f"{url}?page=2&limit=2").get_json()["items"]
    no_face, not_searched = middle
    assert no_face["faces_found"] == 0  # searched, none found: the whole image, and it says so
    assert no_face["faces"][0]["whole_image"] and no_face["faces"][0]["box"] == [0, 0, 200, 100]
    assert no_face["faces"][0]["score"] is None
    assert not_searched["faces_found"] is None and not_searched["faces"][0]["whole_image"]

    last = client.get(f"{url}?page=3&limit=2").get_json()
    assert len(last["items"]) == 1
    failed = last["items"][0]
    assert set(failed) == SEED_KEYS | FACE_KEYS | {"status", "model_version", "error", "image_id"}
    assert (failed["faces"], failed["faces_found"]) == ([], None)
    assert failed["status"] == "failed"
    assert failed["error"] == "not an image"
    assert failed["predicted_emotion"] is None and failed["all_probabilities"] is None

    beyond = client.get(f"{url}?page=999999999999&limit=999999").get_json()
    assert beyond["items"] == [] and beyond["limit"] == 1000


def test_results_filters(client: FlaskClient, finished_job: str) -> None:
    url = f"/api/v1/jobs/{finished_job}/results"
    happy = client.get(f"{url}?emotion=happy").get_json()
    assert happy["total"] == 2
    assert {item["predicted_emotion"] for item in happy["items"]} == {"Happy"}
    surprise = client.get(f"{url}?emotion=Suprise").get_json()  # Kaggle's spelling
    assert [item["predicted_emotion"] for item in surprise["items"]] == ["Surprised"]
    failed = client.get(f"{url}?status=failed").get_json()
    assert [item["image_path"] for item in failed["items"]] == ["img4.png"]
    no_face = client.get(f"{url}?no_face=true").get_json()
    assert [item["image_path"] for item in no_face["items"]] == ["img2.png"]
    assert no_face["total"] == 1
    with_faces = client.get(f"{url}?no_face=false").get_json()
    assert [item["image_path"] for item in with_faces["items"]] == ["img0.png", "img1.png"]
    csv_body = client.get(f"{url}?format=csv&no_face=true").get_data(as_text=True)
    assert len(csv_body.strip().splitlines()) == 2

    error = assert_error(client.get(f"{url}?emotion=bored"), 400, "invalid_emotion")
    assert all(name in error["message"] for name in EMOTIONS)
    assert_error(client.get(f"{url}?status=maybe"), 400, "validation_error")
    assert_error(client.get(f"{url}?format=xml"), 400, "validation_error")
    assert_error(client.get(f"{url}?page=abc"), 400, "validation_error")


def test_results_export_jsonl_and_csv(client: FlaskClient, finished_job: str) -> None:
    url = f"/api/v1/jobs/{finished_job}/results"
    response = client.get(f"{url}?format=jsonl&limit=1")
    assert response.status_code == 200
    assert response.mimetype == "application/x-ndjson"
    assert response.headers["Content-Disposition"].startswith("attachment;")
    lines = [json.loads(line) for line in response.get_data(as_text=True).splitlines()]
    assert len(lines) == 5  # every result, no pagination
    assert lines[0]["confidence"] == 0.5765 and lines[4]["error"] == "not an image"

    response = client.get(f"{url}?format=csv")
    assert response.mimetype == "text/csv"
    assert ".csv" in response.headers["Content-Disposition"]
    rows = list(csv.reader(io.StringIO(response.get_data(as_text=True))))
    assert rows[0] == CSV_HEADER
    records = [dict(zip(CSV_HEADER, row, strict=True)) for row in rows[1:]]
    # One row per face: img1 has two; images without a face or detection have their whole-image
    # row; the failed image one row with its error.
    assert [(r["image_path"], r["face_index"]) for r in records] == [
        ("img0.png", "0"),
        ("img1.png", "0"),
        ("img1.png", "1"),
        ("img2.png", "0"),
        ("img3.png", "0"),
        ("img4.png", ""),
    ]
    record = records[0]
    assert (record["image_path"], record["predicted_emotion"], record["Happy"]) == (
        "img0.png",
        "Happy",
        "0.5765",
    )
    assert (record["model_version"], record["error"]) == ("3", "")
    assert [record[k] for k in ("box_x0", "box_y0", "box_x1", "box_y1")] == [
        "40",
        "20",
        "100",
        "90",
    ]
    assert (record["face_score"], record["whole_image"], record["faces_found"]) == (
        "0.999",
        "False",
        "1",
    )
    second = records[2]
    assert (second["predicted_emotion"], second["Sad"], second["faces_found"]) == (
        "Sad",
        "0.75",
        "2",
    )
    assert (records[3]["whole_image"], records[3]["faces_found"], records[3]["face_score"]) == (
        "True",
        "0",
        "",
    )
    assert records[4]["faces_found"] == ""  # detection did not run
    assert records[5]["error"] == "not an image" and records[5]["box_x0"] == ""

    happy = client.get(f"{url}?format=csv&emotion=Happy").get_data(as_text=True)
    assert len(happy.strip().splitlines()) == 4  # header, img0's face, img1's two faces


def test_results_export_streams_across_batches(
    app, client: FlaskClient, monkeypatch: pytest.MonkeyPatch, finished_job: str
) -> None:
    import api.exports

    monkeypatch.setattr(api.exports, "EXPORT_BATCH", 2)
    body = client.get(f"/api/v1/jobs/{finished_job}/results?format=jsonl").get_data(as_text=True)
    paths = [json.loads(line)["image_path"] for line in body.splitlines()]
    assert paths == [f"img{i}.png" for i in range(5)]


def test_summary(client: FlaskClient, finished_job: str) -> None:
    body = client.get(f"/api/v1/jobs/{finished_job}/summary").get_json()
    assert (body["job_id"], body["status"]) == (finished_job, "completed_with_errors")
    assert (body["total"], body["done"], body["failed"]) == (5, 4, 1)
    assert list(body["emotions"]) == list(EMOTIONS)
    assert body["emotions"]["Happy"]["count"] == 2
    assert body["emotions"]["Happy"]["mean_confidence"] == pytest.approx((0.5765433 + 0.8) / 2)
    assert body["emotions"]["Fear"] == {"count": 0, "mean_confidence": 0.0}
    assert body["faces"] == {
        "faces": 3,
        "images_without_face": 1,
        "images_with_several_faces": 1,
        "not_searched": 1,
    }


def test_cancel(client: FlaskClient, finished_job: str) -> None:
    job_id = upload(client, ["a.png"]).get_json()["id"]
    response = client.delete(f"/api/v1/jobs/{job_id}")
    assert response.status_code == 200
    assert response.get_json()["status"] == "cancelled"
    assert response.get_json()["finished_at"] is not None
    assert_error(client.delete(f"/api/v1/jobs/{job_id}"), 409, "not_cancellable")
    assert_error(client.delete(f"/api/v1/jobs/{finished_job}"), 409, "not_cancellable")
    assert_error(client.delete(f"/api/v1/jobs/{uuid.uuid4()}"), 404, "not_found")


def test_list_jobs_newest_first_with_clamping(client: FlaskClient) -> None:
    ids = [upload(client, [f"{i}.png"]).get_json()["id"] for i in range(3)]
    body = client.get("/api/v1/jobs?limit=100000").get_json()
    assert (body["limit"], body["page"], body["total"]) == (1000, 1, 3)
    assert [item["id"] for item in body["items"]] == ids[::-1]
    assert set(body["items"][0]) >= {"id", "status", "progress", "links", "model_versions"}

    page = client.get("/api/v1/jobs?limit=2&page=2").get_json()
    assert [item["id"] for item in page["items"]] == [ids[0]]
    low = client.get("/api/v1/jobs?limit=0&page=-5").get_json()
    assert (low["limit"], low["page"], len(low["items"])) == (1, 1, 1)
    huge = client.get(f"/api/v1/jobs?page={10**30}").get_json()
    assert huge["items"] == [] and huge["total"] == 3


def test_not_found_and_method_errors(client: FlaskClient) -> None:
    assert_error(client.get(f"/api/v1/jobs/{uuid.uuid4()}"), 404, "not_found")
    assert_error(client.get(f"/api/v1/jobs/{uuid.uuid4()}/results"), 404, "not_found")
    assert_error(client.get(f"/api/v1/jobs/{uuid.uuid4()}/summary"), 404, "not_found")
    assert_error(client.get("/api/v1/jobs/not-a-uuid"), 404, "not_found")
    assert_error(client.get("/api/v1/jobs/1234"), 404, "not_found")
    assert_error(client.get("/api/v1/nothing-here"), 404, "not_found")
    assert_error(client.get("/nothing"), 404, "not_found")
    response = client.put("/api/v1/jobs")
    assert_error(response, 405, "method_not_allowed")
    assert "POST" in response.headers["Allow"]


def test_unhandled_exception_is_json_500(settings: Settings, queue: FakeQueue) -> None:
    app = create_app(settings, broker=queue, registry_factory=lambda: None)

    @app.get("/boom")
    def boom() -> str:
        raise RuntimeError("password=hunter2")

    error = assert_error(app.test_client().get("/boom"), 500, "internal_error")
    assert "hunter2" not in error["message"]


# -- models and health -----------------------------------------------------------------------


def test_models(app, client: FlaskClient) -> None:
    with app.app_context(), services().sessions() as session:
        worker_heartbeats.touch_worker(
            session, "worker-1", model_version=2, device="cpu", backend="onnx", processed=7
        )
        session.commit()
    body = client.get("/api/v1/models").get_json()
    assert (body["model"], body["champion"]) == ("face-emotion", 2)
    assert [v["version"] for v in body["versions"]] == [2, 1]
    newest = body["versions"][0]
    assert newest["aliases"] == ["champion"]
    assert (newest["architecture"], newest["image_size"], newest["accuracy"]) == (
        "efficientnet_lite0",
        224,
        0.93,
    )
    assert (newest["weighted_f1"], newest["macro_f1"], newest["run_id"]) == (0.92, 0.91, "run2")
    assert newest["created_at"].startswith("2023-11-14")
    assert body["versions"][1]["image_size"] is None and body["versions"][1]["accuracy"] is None
    assert body["workers"] == [
        {
            "name": "worker-1",
            "model_version": 2,
            "device": "cpu",
            "backend": "onnx",
            "state": None,
            "images_processed": 7,
            "last_seen": body["workers"][0]["last_seen"],
        }
    ]
    assert body["worker_stale_seconds"] == 60


def test_models_lists_the_gpu_of_each_pool_process(app, client: FlaskClient) -> None:
    """Issue 15: one worker on two GPUs is two processes, each on its own device."""
    with app.app_context(), services().sessions() as session:
        for pid, device in ((11, "cuda:0"), (12, "cuda:1")):
            worker_heartbeats.touch_worker(
                session, f"gpu-host:{pid}", model_version=None, device=device, backend=None,
                state=worker_heartbeats.IDLE,
            )  # fmt: skip
        session.commit()
    workers = client.get("/api/v1/models").get_json()["workers"]
    assert [(w["name"], w["device"]) for w in workers] == [
        ("gpu-host:11", "cuda:0"),
        ("gpu-host:12", "cuda:1"),
    ]
    schema = client.get("/openapi.json").get_json()["components"]["schemas"]["WorkerOut"]
    assert "cuda:N" in schema["properties"]["device"]["description"]


def test_models_registry_down_is_503(client: FlaskClient, registry: FakeRegistry) -> None:
    registry.up = False
    assert_error(client.get("/api/v1/models"), 503, "registry_unavailable")


def test_registry_factory_failure_is_retried(settings: Settings, queue: FakeQueue) -> None:
    attempts: list[int] = []
    working = FakeRegistry([])

    def factory() -> FakeRegistry:
        attempts.append(1)
        if len(attempts) == 1:
            raise ConnectionError("mlflow down")
        return working

    client = authed_client(create_app(settings, broker=queue, registry_factory=factory))
    assert_error(client.get("/api/v1/models"), 503, "registry_unavailable")
    assert client.get("/api/v1/models").status_code == 200
    assert client.get("/api/v1/models").status_code == 200
    assert len(attempts) == 2  # cached once built


def test_health_and_readiness(client: FlaskClient, queue: FakeQueue, registry) -> None:
    assert client.get("/healthz").get_json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.get_json()
    assert (body["status"], body["checks"]) == (
        "ready",
        {"database": "ok", "broker": "ok", "registry": "ok"},
    )
    # Ready, yet nothing consumes the queues here: said, without failing the probe.
    assert any("no inference worker" in warning for warning in body["warnings"])
    queue.up = False
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.get_json()["status"] == "unavailable"
    assert down.get_json()["checks"]["broker"] != "ok"
    assert down.get_json()["checks"]["database"] == "ok"
    queue.up = True
    registry.client.up = False
    down = client.get("/readyz")
    assert down.status_code == 503
    assert down.get_json()["checks"]["registry"].startswith("failed")
    assert client.get("/healthz").status_code == 200  # liveness ignores dependencies


def test_openapi_documents_every_route(app, client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    assert spec["info"]["title"] == "face-emotions"
    assert client.get("/docs").status_code == 200
    checked = 0
    for rule in app.url_map.iter_rules():
        if not (rule.rule.startswith("/api/v1") or rule.rule in {"/healthz", "/readyz"}):
            continue
        path = re.sub(r"<(?:[^:<>]+:)?([^<>]+)>", r"{\1}", rule.rule)
        assert path in spec["paths"], path
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            operation = spec["paths"][path][method.lower()]
            assert operation["responses"], (path, method)
            success = [code for code in operation["responses"] if code.startswith("2")]
            assert success, (path, method)
            for code in success:
                content = operation["responses"][code].get("content", {})
                expected = "image/jpeg" if path.endswith("/thumbnail") else "application/json"
                expected = "application/zip" if path.endswith("/artifact") else expected
                assert expected in content, (path, method, code)
            checked += 1
    # jobs: post, list, get, delete, results, summary, image thumbnail; models: list,
    # evaluation, promote, import, artifact; 2 probes; training runs: post, list, get, delete
    assert checked == 18
    post = spec["paths"]["/api/v1/jobs"]["post"]
    assert set(post["requestBody"]["content"]) == {"multipart/form-data", "application/json"}
    error_schema = spec["components"]["schemas"]["ErrorOut"]
    assert "error" in error_schema["properties"]


# -- the broker client ------------------------------------------------------------------------


def test_broker_client_sends_the_chunk_task() -> None:
    from face_emotions.jobs.broker import BrokerClient
    from face_emotions.jobs.protocol import CLASSIFY_TASK
    from face_emotions.jobs.protocol import INFERENCE_QUEUE

    broker = BrokerClient("memory://")
    assert broker.ping() is True
    broker.send_chunk("job-1", [4, 5, 6])
    with broker.connection() as connection:
        simple = connection.SimpleQueue(INFERENCE_QUEUE)
        try:
            message = simple.get(timeout=2)
            assert message.headers["task"] == CLASSIFY_TASK
            assert message.headers["id"] == message.properties["correlation_id"]
            args, kwargs, _ = message.payload
            assert (args, kwargs) == ([], {"job_id": "job-1", "image_ids": [4, 5, 6]})
            message.ack()
        finally:
            simple.close()


def test_broker_client_with_the_broker_down_fails_fast() -> None:
    import time

    from kombu.exceptions import OperationalError

    from face_emotions.jobs.broker import BrokerClient

    broker = BrokerClient("redis://127.0.0.1:1/0")
    started = time.monotonic()
    assert broker.ping() is False
    with pytest.raises(OperationalError):
        broker.send_chunk("job-1", [1])
    assert time.monotonic() - started < 15


# -- admission: rate limit and back-pressure -------------------------------------------------


def test_submissions_are_rate_limited_per_token(
    settings: Settings, queue: FakeQueue, registry: FakeRegistry
) -> None:
    from face_emotions.jobs import tokens as db_tokens

    limited = settings.model_copy(update={"submit_rate_limit": "2/minute"})
    app = create_app(limited, broker=queue, registry_factory=lambda: registry)
    client = authed_client(app)
    key = {"Idempotency-Key": "first"}
    assert upload(client, ["a.png"], headers=key).status_code == 202
    assert upload(client, ["b.png"]).status_code == 202
    # A replay of a used key creates nothing and does not count.
    assert upload(client, ["a.png"], headers=key).status_code == 200
    refused = upload(client, ["c.png"])
    error = assert_error(refused, 429, "rate_limited")
    assert "2 per 1 minute" in error["message"]
    assert 1 <= int(refused.headers["Retry-After"]) <= 60
    assert count_jobs(app) == 2
    # Other tokens have their own budget; reads are not limited.
    with app.app_context(), services().sessions() as session:
        other = db_tokens.create_token(session, role="submit")
        session.commit()
    response = upload(client, ["d.png"], headers={"Authorization": f"Bearer {other.token}"})
    assert response.status_code == 202
    assert client.get("/api/v1/jobs").status_code == 200


def test_a_bad_rate_limit_stops_start_up(settings: Settings, queue: FakeQueue) -> None:
    broken = settings.model_copy(update={"submit_rate_limit": "lots"})
    with pytest.raises(ValueError, match="EMOTIONS_SUBMIT_RATE_LIMIT"):
        create_app(broken, broker=queue, registry_factory=lambda: None)


def test_unreachable_rate_limit_redis_falls_back_to_memory(
    settings: Settings, queue: FakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    dead = settings.model_copy(
        update={"broker_url": "redis://127.0.0.1:1/0", "submit_rate_limit": "1/minute"}
    )
    app = create_app(dead, broker=queue, registry_factory=lambda: None)
    assert "unreachable" in caplog.text
    client = authed_client(app)
    assert upload(client, ["a.png"]).status_code == 202
    assert_error(upload(client, ["b.png"]), 429, "rate_limited")


def test_backlog_over_the_limit_is_503_and_stores_nothing(
    settings: Settings, queue: FakeQueue, registry: FakeRegistry
) -> None:
    small = settings.model_copy(update={"max_queued_images": 3})
    app = create_app(small, broker=queue, registry_factory=lambda: registry)
    client = authed_client(app)
    first = upload(client, ["a.png", "b.png"])
    assert first.status_code == 202
    files = stored_files(settings)

    refused = upload(client, ["c.png", "d.png"])
    error = assert_error(refused, 503, "overloaded")
    assert "2 images are waiting" in error["message"]
    assert refused.headers["Retry-After"] == "30"
    assert stored_files(settings) == files and count_jobs(app) == 1
    assert not any(
        p.name != first.get_json()["id"] for p in (storage_dir(settings) / "jobs").iterdir()
    )

    zipped = io.BytesIO()
    with zipfile.ZipFile(zipped, "w") as archive:
        archive.writestr("x.png", png())
        archive.writestr("y.png", png())
    zipped.seek(0)
    response = client.post(
        "/api/v1/jobs", data={"files": [(zipped, "two.zip")]}, content_type="multipart/form-data"
    )
    assert_error(response, 503, "overloaded")
    assert stored_files(settings) == files and count_jobs(app) == 1

    folder = settings.resolved_data_root / "two"
    folder.mkdir()
    for name in ("x.png", "y.png"):
        (folder / name).write_bytes(png())
    assert_error(client.post("/api/v1/jobs", json={"folder": "two"}), 503, "overloaded")

    assert upload(client, ["c.png"]).status_code == 202  # 2 + 1 fit
    # Finished work leaves the backlog: results for the first job make room again.
    finished = job_images(app, first.get_json()["id"])
    with app.app_context(), services().sessions() as session:
        result_writes.record_results(
            session,
            uuid.UUID(first.get_json()["id"]),
            [result_writes.ResultRow(image_id=image.id, error="x") for image in finished],
            model_version=1,
            worker="w",
        )
        session.commit()
    assert upload(client, ["e.png", "f.png"]).status_code == 202


def test_part_content_types(client: FlaskClient, app, settings: Settings) -> None:
    def send(name: str, content_type: str | None):
        storage = FileStorage(io.BytesIO(png()), filename=name, content_type=content_type)
        return client.post(
            "/api/v1/jobs", data={"files": [storage]}, content_type="multipart/form-data"
        )

    for name, declared in [
        ("a.png", "text/html"),
        ("a.png", "text/plain"),
        ("a.png", "application/x-msdownload"),
        ("a.zip", "application/javascript"),
    ]:
        error = assert_error(send(name, declared), 400, "unsupported_file")
        assert declared in error["message"]
    assert count_jobs(app) == 0 and stored_files(settings) == []
    for declared in ("image/png", "application/octet-stream", "image/jpeg", None):
        assert send("a.png", declared).status_code == 202, declared


def test_documented_submission_bodies_match_the_validating_schemas(client: FlaskClient) -> None:
    from api.schemas.jobs import JobFolderIn
    from api.schemas.jobs import JobUploadForm

    content = client.get("/openapi.json").get_json()["paths"]["/api/v1/jobs"]["post"][
        "requestBody"
    ]["content"]
    json_body = content["application/json"]["schema"]
    assert set(json_body["properties"]) == set(JobFolderIn().fields)
    assert json_body["required"] == ["folder"] and json_body["additionalProperties"] is False
    multipart = content["multipart/form-data"]["schema"]
    assert set(multipart["properties"]) == set(JobUploadForm().fields) | {"files"}
    assert multipart["properties"]["files"]["items"]["format"] == "binary"


def test_path_parameters_document_their_converters(client: FlaskClient) -> None:
    paths = client.get("/openapi.json").get_json()["paths"]
    [job_id] = [p for p in paths["/api/v1/jobs/{job_id}"]["get"]["parameters"] if p["in"] == "path"]
    assert job_id["schema"] == {"type": "string", "format": "uuid"}
    [version] = paths["/api/v1/models/{version}/promote"]["post"]["parameters"]
    assert version["schema"] == {"type": "integer", "minimum": 0}
