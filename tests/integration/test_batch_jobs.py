"""Batch jobs end to end: REST API -> Redis -> Celery worker processes -> SQL results."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine
from sqlalchemy import func
from sqlalchemy import select

from face_emotions.data.sample_faces import render_face
from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Result
from face_emotions.labels import EMOTIONS
from tests.contract import SEED_KEYS
from tests.integration.conftest import wait_for_job
from tests.zip_archives import make_zip

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def face_png(index: int, size: int = 64) -> bytes:
    rng = np.random.default_rng(index)
    image = render_face(EMOTIONS[index % len(EMOTIONS)], rng, size=size)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_faces(folder: Path, count: int, *, size: int = 64) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"face_{i:04d}.png"
        path.write_bytes(face_png(i, size))
        paths.append(path)
    return paths


def all_results(client, job_id: str) -> list[dict]:
    items: list[dict] = []
    page = 1
    while True:
        body = client.get(f"/api/v1/jobs/{job_id}/results?page={page}&limit=1000").get_json()
        items += body["items"]
        if len(items) >= body["total"] or not body["items"]:
            return items
        page += 1


def assert_seed_shape(items: list[dict]) -> None:
    for item in items:
        assert set(item) >= SEED_KEYS
        assert list(item["all_probabilities"]) == list(EMOTIONS)
        assert sum(item["all_probabilities"].values()) == pytest.approx(1.0, abs=2e-3)
        assert item["predicted_emotion"] == EMOTIONS[item["predicted_class"]]
        assert item["confidence"] == max(item["all_probabilities"].values())


def db_rows(services, job_id: str):
    """(position, chunk, model_version, worker, forward_batch) per image, straight from SQL."""
    import uuid

    engine = create_engine(services.database_url)
    try:
        with engine.connect() as connection:
            return connection.execute(
                select(
                    Image.position,
                    Image.chunk,
                    Result.model_version,
                    Result.worker,
                    Result.forward_batch,
                )
                .outerjoin(Result, Result.image_id == Image.id)
                .where(Image.job_id == uuid.UUID(job_id))
                .order_by(Image.position)
            ).all()
    finally:
        engine.dispose()


def test_upload_zip_and_folder_jobs(services, api, start_worker) -> None:
    start_worker()
    # Upload: several files in one multipart request.
    files = [(io.BytesIO(face_png(i)), f"face_{i}.png") for i in range(6)]
    upload = api.post("/api/v1/jobs", data={"files": files, "batch_size": "4"})
    assert upload.status_code == 202, upload.get_json()
    assert upload.headers["Location"].endswith(upload.get_json()["id"])
    # Zip: one archive.
    archive = make_zip([(f"nested/z_{i}.png", face_png(100 + i)) for i in range(5)])
    zipped = api.post("/api/v1/jobs", data={"files": [(archive, "faces.zip")]})
    assert zipped.status_code == 202, zipped.get_json()
    # Folder: a path under EMOTIONS_DATA_ROOT.
    write_faces(services.data_root / "batch" / "sub", 4)
    write_faces(services.data_root / "batch", 3)
    folder = api.post("/api/v1/jobs", json={"folder": "batch", "recursive": True})
    assert folder.status_code == 202, folder.get_json()

    for response, expected in ((upload, 6), (zipped, 5), (folder, 7)):
        job_id = response.get_json()["id"]
        job = wait_for_job(api, job_id)
        assert job["status"] == "succeeded", job
        assert (job["total"], job["done"], job["failed"]) == (expected, expected, 0)
        assert job["progress"] == 1.0
        items = all_results(api, job_id)
        assert len(items) == expected
        assert len({item["image_path"] for item in items}) == expected
        assert_seed_shape(items)
    zip_paths = {item["image_path"] for item in all_results(api, zipped.get_json()["id"])}
    assert zip_paths == {f"nested/z_{i}.png" for i in range(5)}
    summary = api.get(f"/api/v1/jobs/{folder.get_json()['id']}/summary").get_json()
    assert sum(e["count"] for e in summary["emotions"].values()) == 7


@pytest.mark.parametrize("services", ["postgresql"], indirect=True)
def test_large_job_is_micro_batched_and_shared_by_two_workers(services, api, start_worker) -> None:
    write_faces(services.data_root / "big", 200, size=48)
    first = start_worker("w1", wait=False)
    second = start_worker("w2", wait=False)
    first.wait_ready()
    second.wait_ready()
    response = api.post("/api/v1/jobs", json={"folder": "big", "batch_size": 8})
    assert response.status_code == 202
    job_id = response.get_json()["id"]
    job = wait_for_job(api, job_id)
    assert job["status"] == "succeeded" and job["done"] == 200

    rows = db_rows(services, job_id)
    assert len(rows) == 200 and all(row.model_version is not None for row in rows)
    chunks = {row.chunk for row in rows}
    assert len(chunks) > 1, "the job was not split into chunks"
    assert max(row.forward_batch for row in rows) > 1, "no forward pass saw more than one image"
    assert max(row.forward_batch for row in rows) <= 8
    workers = {row.worker for row in rows}
    assert len(workers) == 2, f"one worker did all the work: {workers}"


@pytest.mark.parametrize("services", ["postgresql"], indirect=True)
def test_promotion_during_a_job_hot_reloads(services, api, start_worker, model_store) -> None:
    registry = model_store.registry()
    old, new = model_store.versions
    registry.set_alias(old)
    write_faces(services.data_root / "reload", 300, size=48)
    worker = start_worker("reloader")
    pids_before = (worker.process.pid, worker.pool_pids())

    # batch_size 2: many micro-batches, so the job is still running when the alias moves.
    response = api.post("/api/v1/jobs", json={"folder": "reload", "batch_size": 2})
    job_id = response.get_json()["id"]
    deadline = time.monotonic() + 60
    while api.get(f"/api/v1/jobs/{job_id}").get_json()["done"] < 20:
        assert time.monotonic() < deadline, worker.log()
        time.sleep(0.05)
    registry.set_alias(new)
    from celery import Celery

    Celery(broker=services.broker_url).control.broadcast("emotions_reload_model")
    try:
        job = wait_for_job(api, job_id, timeout=180)
    finally:
        registry.set_alias(old)

    assert job["status"] == "succeeded", job
    rows = db_rows(services, job_id)
    assert len(rows) == 300 and all(row.model_version is not None for row in rows)
    versions = [row.model_version for row in rows]
    assert versions[0] == old and versions[-1] == new, worker.log()
    # One worker, in order: once the new version served an image, the old one never did again.
    first_new = versions.index(new)
    assert set(versions[first_new:]) == {new}
    assert job["model_versions"] == [old, new]
    assert (worker.process.pid, worker.pool_pids()) == pids_before, "the worker restarted"


def test_bad_files_become_per_image_errors(services, api, start_worker) -> None:
    start_worker()
    good = face_png(1)
    files = [
        (io.BytesIO(good), "good_1.png"),
        (io.BytesIO(face_png(2)), "good_2.png"),
        (io.BytesIO(good[: len(good) // 2]), "truncated.png"),
        (io.BytesIO(b""), "empty.jpg"),
        (io.BytesIO(b"this is not an image at all"), "text.png"),
        (io.BytesIO(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64), "corrupt.png"),
    ]
    response = api.post("/api/v1/jobs", data={"files": files})
    assert response.status_code == 202, response.get_json()
    job = wait_for_job(api, response.get_json()["id"])
    assert job["status"] == "completed_with_errors", job
    assert (job["done"], job["failed"]) == (2, 4)
    items = {item["image_path"]: item for item in all_results(api, job["id"])}
    assert items["good_1.png"]["status"] == "succeeded"
    for name, reason in {
        "truncated.png": "truncated",
        "empty.jpg": "empty file",
        "text.png": "not an image",
        "corrupt.png": "",
    }.items():
        assert items[name]["status"] == "failed"
        assert items[name]["predicted_emotion"] is None
        assert reason in items[name]["error"], items[name]


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
@pytest.mark.parametrize("folder", ["/etc", "../outside", "batch/../../outside", "/"])
def test_folder_escapes_are_refused(services, api, folder: str) -> None:
    outside = services.data_root.parent / "outside"
    write_faces(outside, 1)
    response = api.post("/api/v1/jobs", json={"folder": folder})
    assert response.status_code == 400
    assert set(response.get_json()["error"]) == {"code", "message"}


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_openapi_document_is_valid_and_complete(services, api) -> None:
    from openapi_spec_validator import validate

    spec = api.get("/openapi.json").get_json()
    validate(spec)
    app = api.application
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(("/api/", "/healthz", "/readyz")):
            path = rule.rule
            for arg in rule.arguments:
                path = path.replace(f"<uuid:{arg}>", f"{{{arg}}}").replace(f"<{arg}>", f"{{{arg}}}")
                path = path.replace(f"<int:{arg}>", f"{{{arg}}}")
            routes.add(path)
    assert routes, "no API routes found"
    missing = routes - set(spec["paths"])
    assert not missing, f"routes missing from the OpenAPI document: {missing}"


def test_results_are_exactly_once_after_a_repeated_chunk(services, api, start_worker) -> None:
    """Re-sending every chunk of a finished job writes nothing and changes no counter."""
    import uuid

    from face_emotions.jobs.broker import BrokerClient
    from face_emotions.jobs.database import create_db_engine
    from face_emotions.jobs.database import session_factory
    from face_emotions.jobs.job_queries import chunk_image_ids

    start_worker()
    write_faces(services.data_root / "again", 10, size=48)
    job_id = api.post("/api/v1/jobs", json={"folder": "again", "batch_size": 4}).get_json()["id"]
    first = wait_for_job(api, job_id)
    sessions = session_factory(create_db_engine(services.database_url))
    with sessions() as session:
        chunks = chunk_image_ids(session, uuid.UUID(job_id))
    queue = BrokerClient(services.broker_url)
    for image_ids in chunks.values():
        queue.send_chunk(job_id, image_ids)
    time.sleep(3)
    again = api.get(f"/api/v1/jobs/{job_id}").get_json()
    assert (again["done"], again["failed"], again["status"]) == (10, 0, first["status"])
    with sessions() as session:
        count = session.scalar(
            select(func.count()).select_from(Result).where(Result.job_id == uuid.UUID(job_id))
        )
    assert count == 10


@pytest.mark.parametrize("services", ["postgresql"], indirect=True)
def test_pinned_version_is_served_alongside_the_champion(
    services, api, start_worker, model_store
) -> None:
    old, new = model_store.versions
    model_store.registry().set_alias(old)
    start_worker()
    write_faces(services.data_root / "pin", 6, size=48)
    pinned = api.post("/api/v1/jobs", json={"folder": "pin", "model_version": new}).get_json()
    plain = api.post("/api/v1/jobs", json={"folder": "pin"}).get_json()
    assert wait_for_job(api, pinned["id"])["model_versions"] == [new]
    assert wait_for_job(api, plain["id"])["model_versions"] == [old]
    missing = api.post("/api/v1/jobs", json={"folder": "pin", "model_version": 999}).get_json()
    job = wait_for_job(api, missing["id"])
    assert job["status"] == "failed" and job["failed"] == 6
    errors = {item["error"] for item in all_results(api, missing["id"])}
    assert len(errors) == 1 and "999" in errors.pop()

    models = api.get("/api/v1/models").get_json()
    assert models["champion"] == old
    assert {v["version"] for v in models["versions"]} >= {old, new}
    assert [w["model_version"] for w in models["workers"]] in ([old], [new])
