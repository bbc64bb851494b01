"""``data.faces=detect``: training crops faces as serving does, and serving crops as trained.

The training folder holds "photos": generated faces pasted at random places into larger noisy
backgrounds, so a whole image and its face crop are different inputs. A version records its
crop (faces, margin, alignment); a worker crops every face exactly that way.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from face_emotions.data.images import decode_image
from face_emotions.data.sample_faces import render_face
from face_emotions.faces.crop import CropSpec
from face_emotions.faces.crop import crop_face
from face_emotions.faces.detection import FaceDetector
from face_emotions.jobs import job_queries
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.bundle import load_bundle
from face_emotions.registry.mlflow_registry import Registry
from face_emotions.serving.chunk_classifier import classify_chunk
from face_emotions.serving.model_holder import ServingModel
from face_emotions.serving.predictor import Predictor
from face_emotions.settings import Settings
from face_emotions.training_config import compose_config
from tests.integration.conftest import wait_for_job
from tests.real_photos import ASTRONAUT_FACE
from tests.real_photos import iou
from tests.real_photos import skimage_photo
from training.datamodule import split_folder
from training.face_crops import FaceCropping
from training.train import run_training

pytestmark = [pytest.mark.integration, pytest.mark.slow]

PER_CLASS = 30
TRAINED_CROP = CropSpec(faces="detect", margin=1.6, align=False)


def write_photo_folder(root: Path, per_class: int = PER_CLASS) -> Path:
    """Generated faces (96 px) pasted at random places into 240x180 noisy backgrounds."""
    rng = np.random.default_rng(5)
    for emotion in EMOTIONS:
        folder = root / ("Suprise" if emotion == "Surprised" else emotion)
        folder.mkdir(parents=True)
        for i in range(per_class):
            face = render_face(emotion, rng, size=96).convert("RGB")
            noise = rng.integers(60, 200, size=(180, 240, 3), dtype=np.uint8)
            canvas = Image.fromarray(noise)
            canvas.paste(face, (int(rng.integers(0, 144)), int(rng.integers(0, 84))))
            canvas.save(folder / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def detect_trained(tmp_path_factory: pytest.TempPathFactory):
    """A tiny cnn trained with data.faces=detect and a margin of its own, registered."""
    folder = write_photo_folder(tmp_path_factory.mktemp("photos"))
    var_dir = tmp_path_factory.mktemp("faces-var")
    os.environ["EMOTIONS_VAR_DIR"] = str(var_dir)
    try:
        cfg = compose_config(
            [
                f"data.path={folder}",
                f"output_dir={var_dir}/runs/{uuid.uuid4().hex[:8]}",
                "training=fast",
                "training.accelerator=cpu",
                "training.progress_bar=false",
                "model=cnn",
                "model.image_size=64",
                "model.options.width=16",
                "model.options.depth=5",
                "training.max_epochs=2",
                "data.faces=detect",
                f"data.crop_margin={TRAINED_CROP.margin}",
            ]
        )
        result = run_training(cfg)
    finally:
        del os.environ["EMOTIONS_VAR_DIR"]
    return SimpleNamespace(folder=folder, var_dir=var_dir, result=result, cfg=cfg)


def test_training_crops_faces_once_and_records_the_crop(detect_trained) -> None:
    result, var_dir = detect_trained.result, detect_trained.var_dir
    faces = result.faces
    assert faces is not None and faces["images"] == 5 * PER_CLASS
    assert faces["cropped"] + faces["no_face"] == faces["images"]  # no_face=keep: none dropped
    # Cartoon faces are found by MTCNN about half the time: both kinds occur here.
    assert faces["cropped"] > 0 and faces["no_face"] > 0
    assert result.summary()["faces"] == faces

    registry = Registry(Settings(var_dir=var_dir))
    assert result.version is not None
    bundle = load_bundle(registry.download(result.version))
    assert bundle.spec.crop == TRAINED_CROP  # the version knows how its inputs were cut
    params = registry.client.get_run(result.run_id).data.params
    assert params["data.faces"] == "detect"
    assert params["faces.no_face"] == str(faces["no_face"])
    assert params["faces.cropped"] == str(faces["cropped"])

    # The evaluation ran on the same crops: a second split reuses every crop from the cache
    # (by content) and holds the same test images the report counted.
    cropping = FaceCropping(
        spec=TRAINED_CROP,
        cache_dir=var_dir / "face-crops",
        detector_factory=FaceDetector,
    )
    split = split_folder(detect_trained.folder, faces=cropping, progress=False)
    assert split.faces is not None and split.faces.cached == faces["images"]
    assert result.report.num_images == len(split.test)
    report = json.loads((result.output_dir / "evaluation.json").read_text())
    assert report["num_images"] == len(split.test)
    crops = [item for item in split.test if item.path in split.sources]
    assert crops, "no crop in the test split"
    for item in crops:
        assert item.path.is_relative_to(var_dir / "face-crops")
        with Image.open(item.path) as crop:
            assert crop.width == crop.height  # the square serving cuts


class RecordingPredictor:
    """A real predictor that keeps what it was given (the worker's inputs)."""

    def __init__(self, predictor: Predictor) -> None:
        self.inner = predictor
        self.spec = predictor.spec
        self.backend = predictor.backend
        self.seen: list[Image.Image] = []

    def predict_images(self, images):
        self.seen += list(images)
        return self.inner.predict_images(images)


class OneModel:
    def __init__(self, predictor) -> None:
        self.predictor = predictor

    @property
    def serving_version(self) -> int:
        return 1

    def for_job(self, pinned):
        return ServingModel(1, self.predictor)

    def describe(self) -> dict:
        return {"version": 1, "device": "cpu", "backend": "torch"}


def test_two_crop_policies_give_the_model_different_inputs(
    detect_trained, jobs_db, tmp_path: Path
) -> None:
    """The same photo, served by the detect-trained version and by a whole-image version of
    the same weights: each gets the crop its own record asks for."""
    registry = Registry(Settings(var_dir=detect_trained.var_dir))
    trained = load_bundle(registry.download(detect_trained.result.version))
    whole = dataclasses.replace(trained, spec=dataclasses.replace(trained.spec, crop=CropSpec()))
    photo = skimage_photo("astronaut.png")
    [face] = FaceDetector().detect(decode_image(photo))
    seen = {}
    for name, bundle in (("trained", trained), ("whole", whole)):
        with jobs_db() as session:
            job = job_queries.create_job(
                session,
                source_type="folder",
                source="photos",
                images=[job_queries.NewImage("astronaut.png", str(photo))],
                batch_size=4,
                chunk_size=4,
            )
            session.commit()
            [(_, ids)] = job_queries.chunk_image_ids(session, job.id).items()
        recorder = RecordingPredictor(Predictor(bundle))
        outcome = classify_chunk(
            jobs_db,
            OneModel(recorder),
            job.id,
            ids,
            settings=Settings(var_dir=tmp_path, decode_threads=1),
            load_image=lambda location, max_pixels: decode_image(location, max_pixels=max_pixels),
            detector=FaceDetector(),
        )
        assert outcome.succeeded == 1
        [seen[name]] = recorder.seen
    image = decode_image(photo)
    side = max(face.box[2] - face.box[0], face.box[3] - face.box[1])
    assert seen["trained"].width == round(side * 1.6)
    assert seen["whole"].width == round(side * CropSpec().margin)
    assert np.array_equal(
        np.asarray(seen["trained"]), np.asarray(crop_face(image, face, TRAINED_CROP))
    )
    assert np.array_equal(np.asarray(seen["whole"]), np.asarray(crop_face(image, face, CropSpec())))


@pytest.mark.parametrize("services", ["sqlite"], indirect=True)
def test_a_worker_serves_the_version_with_its_own_crop(
    detect_trained, services, api, start_worker
) -> None:
    """Through the REST API and a real worker process: the face's probabilities are the model's
    on the 1.6-margin crop the version was trained with."""
    registry = Registry(Settings(var_dir=detect_trained.var_dir))
    start_worker(EMOTIONS_MLFLOW_TRACKING_URI=registry.tracking_uri)
    photo = skimage_photo("astronaut.png")
    response = api.post(
        "/api/v1/jobs",
        data={"files": [(photo.open("rb"), "astronaut.png")]},
        content_type="multipart/form-data",
    )
    job_id = response.get_json()["id"]
    assert wait_for_job(api, job_id)["status"] == "succeeded"
    [item] = api.get(f"/api/v1/jobs/{job_id}/results").get_json()["items"]
    assert item["model_version"] == detect_trained.result.version.version
    [served] = item["faces"]
    assert iou(served["box"], ASTRONAUT_FACE) >= 0.5

    image = decode_image(photo)
    [face] = FaceDetector().detect(image)
    predictor = Predictor(load_bundle(registry.download(detect_trained.result.version)))
    as_trained = predictor.predict_images([crop_face(image, face, TRAINED_CROP)])[0]
    default_crop = predictor.predict_images([crop_face(image, face, CropSpec())])[0]
    got = [served["all_probabilities"][name] for name in EMOTIONS]
    assert np.allclose(got, as_trained, atol=2e-3)
    assert not np.allclose(as_trained, default_crop, atol=1e-4)  # the margin mattered
