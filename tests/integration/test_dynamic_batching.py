"""Dynamic batching end to end: several small jobs share forward passes in one threads-pool
worker, and every job still gets exactly its own results."""

from __future__ import annotations

import io
import itertools
import uuid

import numpy as np
import pytest
from PIL import Image as PILImage
from sqlalchemy import create_engine
from sqlalchemy import select

from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Result
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.bundle import load_bundle
from face_emotions.serving.predictor import Predictor
from tests.integration.conftest import wait_for_job

pytestmark = [pytest.mark.integration, pytest.mark.slow]

JOBS = 12
IMAGES_PER_JOB = 2
#: ONNX Runtime in the worker vs torch here, and different batch neighbours: ~1e-6 apart.
TOLERANCE = 2e-5


def noise_png(seed: int) -> bytes:
    """Noise of a different brightness and colour per image: a random-weights model gives
    each one clearly different probabilities, so rows handed to the wrong job would show."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=3)
    pixels = np.clip(base + rng.normal(0, 60, size=(32, 32, 3)), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    PILImage.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def stored_results(services, job_id: str) -> list[tuple[str, dict, int, int]]:
    """(image path, probabilities as stored, model version, forward batch) of a job's images,
    straight from SQL: the API rounds probabilities to 4 decimals, the database does not."""
    engine = create_engine(services.database_url)
    try:
        with engine.connect() as connection:
            return [
                tuple(row)
                for row in connection.execute(
                    select(
                        Image.path, Result.probabilities, Result.model_version, Result.forward_batch
                    )
                    .join(Result, Result.image_id == Image.id)
                    .where(Image.job_id == uuid.UUID(job_id))
                )
            ]
    finally:
        engine.dispose()


def test_small_jobs_share_forward_passes_and_each_gets_its_own_results(
    services, api, start_worker, model_store
) -> None:
    images = {
        f"job{j:02d}_img{i}.png": noise_png(100 * j + i)
        for j in range(JOBS)
        for i in range(IMAGES_PER_JOB)
    }
    # What the champion (v1) says about each image on its own, in this process.
    predictor = Predictor(load_bundle(model_store.var_dir / "bundle-1"))
    decoded = [PILImage.open(io.BytesIO(data)).convert("RGB") for data in images.values()]
    expected = dict(zip(images, predictor.predict_images(decoded), strict=True))
    closest = min(
        float(np.abs(a - b).max()) for a, b in itertools.combinations(expected.values(), 2)
    )
    assert closest > 10 * TOLERANCE, "the images are too alike to tell their results apart"

    # Queue every job first: the worker then reserves several chunks at once.
    job_ids: dict[str, list[str]] = {}
    names = list(images)
    for j in range(JOBS):
        own = names[j * IMAGES_PER_JOB : (j + 1) * IMAGES_PER_JOB]
        files = [(io.BytesIO(images[name]), name) for name in own]
        response = api.post(
            "/api/v1/jobs", data={"files": files, "batch_size": str(IMAGES_PER_JOB)}
        )
        assert response.status_code == 202, response.get_json()
        job_ids[response.get_json()["id"]] = own
    start_worker(
        "dynamic",
        pool="threads",
        concurrency=6,
        EMOTIONS_DYNAMIC_BATCHING="true",
        EMOTIONS_MAX_BATCH_DELAY_MS="300",
        EMOTIONS_BATCH_SIZE="64",
    )

    shared = 0
    for job_id, own in job_ids.items():
        job = wait_for_job(api, job_id)
        assert job["status"] == "succeeded", job
        items = api.get(f"/api/v1/jobs/{job_id}/results?limit=100").get_json()["items"]
        assert sorted(item["image_path"] for item in items) == sorted(own)
        rows = stored_results(services, job_id)
        assert sorted(path for path, *_ in rows) == sorted(own)
        for path, probabilities, version, _batch in rows:
            got = np.array([probabilities[name] for name in EMOTIONS])
            np.testing.assert_allclose(got, expected[path], atol=TOLERANCE, err_msg=path)
            assert version == model_store.versions[0]
        shared += any(batch > IMAGES_PER_JOB for *_, batch in rows)
    assert shared >= 2, "no forward pass held images of more than one job"
