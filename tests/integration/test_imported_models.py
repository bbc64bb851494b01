"""An imported ONNX version served by a real worker through the REST API, beside a trained
champion: every image's probabilities are ONNX Runtime's, run by hand on the same input."""

from __future__ import annotations

import io
import uuid
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sqlalchemy import create_engine
from sqlalchemy import select

from face_emotions.data.images import decode_image
from face_emotions.data.images import load_batch_array
from face_emotions.jobs.schema import Image
from face_emotions.jobs.schema import Result
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.import_spec import preprocess
from tests.integration.conftest import wait_for_job
from tests.integration.test_batch_jobs import all_results
from tests.integration.test_batch_jobs import write_faces
from tests.onnx_models import FER7
from tests.onnx_models import make_model

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def by_hand(onnx_path: Path, x: np.ndarray) -> np.ndarray:
    """ORT, softmax over the 7 logits, drop disgust and neutral, renormalise, our order."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    kept = p[:, [FER7.index(n) for n in ("angry", "fear", "happy", "sad", "surprise")]]
    return kept / kept.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_imported_version_pinned_beside_a_trained_champion(
    services, api, start_worker, model_store, tmp_path: Path
) -> None:
    trained, _ = model_store.versions
    registry = model_store.registry()
    registry.set_alias(trained)  # a 32 px RGB trained champion
    onnx_path, spec = make_model(tmp_path, size=64, colour="gray", layout="NCHW", seed=5)
    created = api.post(
        "/api/v1/models",
        data={
            "model": (io.BytesIO(onnx_path.read_bytes()), "fer7.onnx"),
            "spec": (io.BytesIO(spec.to_yaml().encode()), "spec.yaml"),
            "promote": "never",
        },
        content_type="multipart/form-data",
    )
    assert created.status_code == 201, created.get_json()
    imported = created.get_json()["version"]
    assert registry.get_version(imported).tags["source"] == "imported"
    assert registry.alias_version().version == trained

    start_worker()
    paths = write_faces(services.data_root / "imp", 6, size=48)
    request = {"folder": "imp", "faces": "none"}
    pinned = api.post("/api/v1/jobs", json={**request, "model_version": imported}).get_json()
    plain = api.post("/api/v1/jobs", json=request).get_json()
    assert wait_for_job(api, pinned["id"])["model_versions"] == [imported]
    assert wait_for_job(api, plain["id"])["model_versions"] == [trained]

    decoded = [decode_image(path) for path in paths]
    expected = by_hand(onnx_path, preprocess(spec, load_batch_array(decoded, 64)))
    by_name = {path.name: row for path, row in zip(paths, expected, strict=True)}
    engine = create_engine(services.database_url)
    with engine.connect() as connection:
        rows = connection.execute(
            select(Image.path, Result.probabilities, Result.model_version)
            .join(Result, Result.image_id == Image.id)
            .where(Result.job_id == uuid.UUID(pinned["id"]))
        ).all()
    engine.dispose()
    assert len(rows) == 6
    for path, probabilities, version in rows:
        assert version == imported
        stored = [probabilities[name] for name in EMOTIONS]
        np.testing.assert_allclose(stored, by_name[Path(path).name], atol=1e-5)
    for item in all_results(api, pinned["id"]):  # the API rounds to 4 decimals
        row = by_name[Path(item["image_path"]).name]
        served = [item["all_probabilities"][name] for name in EMOTIONS]
        np.testing.assert_allclose(served, row, atol=6e-5)
        assert item["predicted_emotion"] == EMOTIONS[int(np.argmax(row))]
    champion_items = all_results(api, plain["id"])
    assert len(champion_items) == 6
