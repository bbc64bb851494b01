"""Imported ONNX versions in a real MLflow store: registered, evaluated, promoted, served with
their own preprocessing, exported and imported back; the CLI and the API over the same path."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from face_emotions.cli.main import main as cli
from face_emotions.data.images import load_batch_array
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import save_bundle
from face_emotions.modeling.bundle import save_imported_bundle
from face_emotions.modeling.import_spec import load_spec_text
from face_emotions.modeling.import_spec import preprocess
from face_emotions.modeling.zoo import create_model
from face_emotions.registry.mlflow_registry import Registry
from face_emotions.serving.model_import import import_model
from face_emotions.serving.predictor import Predictor
from face_emotions.settings import Settings
from tests.onnx_models import FER7
from tests.onnx_models import FER8
from tests.onnx_models import make_model
from tests.unit.test_registry import _isolate_mlflow

VARIANTS = [
    (FER7, "gray", "NCHW", "logits", 64),
    (FER8, "rgb", "NHWC", "probabilities", 112),
    (FER7, "rgb", "NCHW", "probabilities", 48),
    (FER8, "gray", "NHWC", "logits", 56),
]


def images(count: int = 6, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 256, (40 + 7 * i, 50, 3), dtype=np.uint8))
        for i in range(count)
    ]


def by_hand(onnx_path: Path, x: np.ndarray, labels: list[str], output: str) -> np.ndarray:
    """ONNX Runtime on the preprocessed input, then the mapping computed in plain numpy."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    raw = session.run(None, {session.get_inputs()[0].name: x})[0].astype(np.float64)
    if output == "logits":
        raw = np.exp(raw - raw.max(axis=1, keepdims=True))
        raw /= raw.sum(axis=1, keepdims=True)
    names = {"anger": "angry", "fearful": "fear", "happiness": "happy", "sadness": "sad"}
    wanted = ["angry", "fear", "happy", "sad", "surprise"]
    columns = [[names.get(label, label) for label in labels].index(w) for w in wanted]
    kept = raw[:, columns]
    return kept / kept.sum(axis=1, keepdims=True)


@pytest.mark.parametrize(("labels", "colour", "layout", "output", "size"), VARIANTS)
def test_served_probabilities_equal_onnx_runtime_by_hand(
    tmp_path: Path, labels, colour, layout, output, size
) -> None:
    onnx_path, spec = make_model(
        tmp_path, labels=labels, colour=colour, layout=layout, output=output, size=size
    )
    bundle = load_bundle(save_imported_bundle(tmp_path / "bundle", onnx_path, spec))
    predictor = Predictor(bundle, backend="torch")  # an imported version is ONNX whatever
    assert predictor.backend == "onnx" and predictor.image_size == size
    decoded = images()
    served = predictor.predict_images(decoded)
    x = preprocess(spec, load_batch_array(decoded, size))
    assert x.shape == tuple(len(decoded) if d == "N" else d for d in spec.input_shape())
    np.testing.assert_allclose(served, by_hand(onnx_path, x, labels, output), atol=1e-5)
    np.testing.assert_allclose(served.sum(axis=1), 1.0, atol=1e-5)


# --- a real registry -------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Registry]:
    from face_emotions.settings import get_settings

    _isolate_mlflow(monkeypatch)
    monkeypatch.setenv("EMOTIONS_VAR_DIR", str(tmp_path / "var"))
    monkeypatch.setenv("EMOTIONS_BROKER_URL", "memory://")
    get_settings.cache_clear()
    yield Registry(Settings())
    get_settings.cache_clear()


def labelled_folder(root: Path, predictor: Predictor, count: int = 20) -> Path:
    """Images labelled by ``predictor``'s own answers: it scores 100 % here, others do not."""
    decoded = images(count, seed=3)
    for index, (image, row) in enumerate(
        zip(decoded, predictor.predict_images(decoded), strict=True)
    ):
        folder = root / EMOTIONS[int(row.argmax())]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    return root


def test_import_evaluate_and_promote(tmp_path: Path, registry: Registry) -> None:
    good, good_spec = make_model(tmp_path, seed=1)
    worse, worse_spec = make_model(tmp_path, seed=2)
    reference = Predictor(load_bundle(save_imported_bundle(tmp_path / "b", good, good_spec)))
    folder = labelled_folder(tmp_path / "eval", reference)

    first = import_model(registry, good, good_spec, eval_folder=folder)
    assert first.decision.promote and "no champion yet" in first.decision.reason
    assert first.report is not None and first.report.accuracy == 1.0
    tags = first.version.tags
    assert tags["source"] == "imported" and tags["architecture"] == "onnx-import"
    assert json.loads(tags["label_mapping"])["neutral"] is None
    assert json.loads(tags["import_spec"])["labels"] == FER7
    assert len(tags["onnx_sha256"]) == 64 and float(tags["accuracy"]) == 1.0
    assert registry.evaluation(first.version.version)["confusion_matrix"]

    second = import_model(registry, worse, worse_spec, eval_folder=folder)
    assert not second.decision.promote
    assert "does not beat the champion" in second.decision.reason
    assert registry.alias_version().version == first.version.version

    unevaluated = import_model(registry, worse, worse_spec, promote_mode="auto")
    assert not unevaluated.decision.promote and "only promote=force" in unevaluated.decision.reason
    forced = import_model(registry, worse, worse_spec, promote_mode="force")
    assert forced.decision.promote
    assert registry.alias_version().version == forced.version.version


def test_cli_import_prints_the_mapping_and_refuses_without_registering(
    tmp_path: Path, registry: Registry
) -> None:
    model, spec = make_model(tmp_path, labels=FER8, colour="rgb", layout="NHWC")
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text(spec.to_yaml())
    runner = CliRunner()
    result = runner.invoke(
        cli, ["models", "import", str(model), "--spec", str(spec_file), "--promote", "never"]
    )
    assert result.exit_code == 0, result.output
    assert "happiness -> Happy" in result.output and "contempt -> (dropped)" in result.output
    assert "registered version 1" in result.output and "not promoted" in result.output
    listed = runner.invoke(cli, ["models"])
    assert "(imported)" in listed.output

    bad_spec = tmp_path / "bad.yaml"
    bad_spec.write_text(spec.model_copy(update={"input_size": 96}).to_yaml())
    refused = runner.invoke(cli, ["models", "import", str(model), "--spec", str(bad_spec)])
    assert refused.exit_code == 2 and "input has shape" in refused.output
    unmapped = tmp_path / "unmapped.yaml"
    unmapped.write_text(spec.model_copy(update={"labels": [*FER8[:4], "x", *FER8[5:]]}).to_yaml())
    refused = runner.invoke(cli, ["models", "import", str(model), "--spec", str(unmapped)])
    assert refused.exit_code == 2 and "no label maps to Angry" in refused.output
    assert [v.version for v in registry.list_versions()] == [1]


def test_export_then_reimport_of_a_trained_version_predicts_the_same(
    tmp_path: Path, registry: Registry
) -> None:
    torch.manual_seed(0)
    model = create_model("cnn").eval()
    spec = ModelSpec.for_architecture("cnn", image_size=40)
    bundle_dir = save_bundle(tmp_path / "trained", model, spec)
    run = registry.client.create_run(registry.experiment_id())
    trained = registry.publish(bundle_dir, run_id=run.info.run_id, tags={"architecture": "cnn"})

    result = CliRunner().invoke(
        cli, ["models", "export", str(trained.version), "-o", str(tmp_path / "out")]
    )
    assert result.exit_code == 0, result.output
    exported = load_spec_text((tmp_path / "out" / "spec.yaml").read_text())
    assert exported.labels == list(EMOTIONS) and exported.input_size == 40
    outcome = import_model(
        registry, tmp_path / "out" / "model.onnx", exported, promote_mode="never"
    )
    reimported = load_bundle(registry.download(outcome.version))
    original = load_bundle(registry.download(trained))
    decoded = images(8)
    expected = Predictor(original, backend="torch").predict_images(decoded)
    np.testing.assert_allclose(Predictor(reimported).predict_images(decoded), expected, atol=1e-5)
    np.testing.assert_allclose(
        Predictor(original, backend="onnx").predict_images(decoded), expected, atol=1e-5
    )


def test_api_import_and_artifact(tmp_path: Path, registry: Registry) -> None:
    from api.app import create_app
    from tests.unit.test_api import ADMIN_TOKEN
    from tests.unit.test_api import FakeQueue

    settings = Settings(
        var_dir=registry.settings.var_dir,
        data_root=tmp_path,
        admin_token=ADMIN_TOKEN,
        broker_url="memory://",
        max_import_mb=1,
    )
    app = create_app(settings, broker=FakeQueue(), registry_factory=lambda: registry)
    client = app.test_client()
    client.environ_base["HTTP_AUTHORIZATION"] = f"Bearer {ADMIN_TOKEN}"
    model, spec = make_model(tmp_path)

    def post(data: bytes, spec_text: str, **fields: str):
        form = {"model": (io.BytesIO(data), "m.onnx"), "spec": spec_text, **fields}
        return client.post("/api/v1/models", data=form, content_type="multipart/form-data")

    refusals = {
        "not onnx": post(b"hello", spec.to_yaml()),
        "truncated": post(model.read_bytes()[:300], spec.to_yaml()),
        "shape": post(model.read_bytes(), spec.model_copy(update={"input_size": 50}).to_yaml()),
        "labels": post(model.read_bytes(), spec.model_copy(update={"labels": FER8}).to_yaml()),
        "size": post(b"\x08" + bytes(2**20 + 10), spec.to_yaml()),
        "spec": post(model.read_bytes(), "input_size: [1"),
    }
    for name, response in refusals.items():
        assert response.status_code == 400, (name, response.json)
        assert response.json["error"]["code"] == "import_refused", name
    messages = {name: r.json["error"]["message"] for name, r in refusals.items()}
    assert len(set(messages.values())) == len(refusals), messages["size"]
    assert registry.list_versions() == []

    created = post(model.read_bytes(), spec.to_yaml(), promote="force")
    assert created.status_code == 201, created.json
    body = created.json
    assert body["label_mapping"]["disgust"] is None and body["promoted"]
    listed = client.get("/api/v1/models").json
    assert listed["champion"] == body["version"]

    artifact = client.get(f"/api/v1/models/{body['version']}/artifact")
    assert artifact.status_code == 200 and artifact.mimetype == "application/zip"
    with zipfile.ZipFile(io.BytesIO(artifact.data)) as archive:
        assert archive.read("model.onnx") == model.read_bytes()
        assert load_spec_text(archive.read("spec.yaml")) == spec
    assert client.get("/api/v1/models/99/artifact").status_code == 404
