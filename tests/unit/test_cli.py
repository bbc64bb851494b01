"""The ``face-emotions`` console script, driven through click's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from click.testing import Result

from face_emotions.cli.main import main
from face_emotions.data.images import decode_image
from face_emotions.data.sample_faces import render_face
from face_emotions.faces.crop import CropSpec
from face_emotions.faces.crop import crop_face
from face_emotions.faces.detection import Face
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.bundle import SPEC_FILE
from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import save_bundle
from face_emotions.modeling.zoo import create_model
from face_emotions.serving.predictor import Predictor

RECORD_KEYS = ["image_path", "predicted_class", "predicted_emotion", "confidence"]
FACE_KEYS = ["faces_found", "image_size", "faces"]


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    spec = ModelSpec.for_architecture("cnn", image_size=32)
    directory = tmp_path_factory.mktemp("cli") / "bundle"
    return save_bundle(directory, create_model("cnn"), spec, export_onnx=False)


@pytest.fixture
def images_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    render_face("Happy", np.random.default_rng(0), size=40).save(folder / "a.png")
    render_face("Sad", np.random.default_rng(1), size=56).save(folder / "b.jpg", quality=90)
    render_face("Fear", np.random.default_rng(2), size=48).save(folder / "nested" / "c.png")
    (folder / "zz_broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but then garbage")
    (folder / "notes.txt").write_text("not an image file, skipped by extension")
    return folder


def _invoke(*args: str) -> Result:
    return CliRunner().invoke(main, list(args))


def test_sample_data(tmp_path: Path) -> None:
    out = tmp_path / "faces"
    result = _invoke("sample-data", str(out), "--per-class", "2", "--seed", "1", "--quiet")
    assert result.exit_code == 0, result.output
    files = sorted(p for p in out.rglob("*") if p.is_file())
    assert len(files) == 10
    assert sorted({p.parent.name for p in files}) == sorted(EMOTIONS)
    for emotion in EMOTIONS:
        assert len(list((out / emotion).iterdir())) == 2
    for path in files:
        decode_image(path)  # every file is a readable image
    assert "wrote 10 images" in result.stderr


def test_sample_data_is_reproducible(tmp_path: Path) -> None:
    for name in ("x", "y"):
        result = _invoke("sample-data", str(tmp_path / name), "--per-class", "1", "--quiet")
        assert result.exit_code == 0, result.output
    x = sorted(p.relative_to(tmp_path / "x") for p in (tmp_path / "x").rglob("*.*"))
    y = sorted(p.relative_to(tmp_path / "y") for p in (tmp_path / "y").rglob("*.*"))
    assert x == y and x
    for rel in x:
        assert (tmp_path / "x" / rel).read_bytes() == (tmp_path / "y" / rel).read_bytes()


def test_infer_folder_with_a_corrupt_file(
    tmp_path: Path, bundle_dir: Path, images_dir: Path
) -> None:
    out = tmp_path / "results" / "out.json"
    result = _invoke(
        "infer", "--model", str(bundle_dir), str(images_dir), "--quiet", "-o", str(out)
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # the document went to --output
    document = json.loads(out.read_text())
    assert document["model_checkpoint"] == str(bundle_dir)
    assert document["images_path"] == str(images_dir)
    assert document["num_images"] == 3
    assert document["num_errors"] == 1
    assert len(document["errors"]) == 1
    assert document["errors"][0]["image_path"] == str(images_dir / "zz_broken.png")
    assert document["errors"][0]["error"]

    predictions = document["predictions"]
    expected_paths = [images_dir / "a.png", images_dir / "b.jpg", images_dir / "nested" / "c.png"]
    assert [p["image_path"] for p in predictions] == [str(p) for p in expected_paths]
    predictor = Predictor(load_bundle(bundle_dir))
    for record, path in zip(predictions, expected_paths, strict=True):
        # The seed's keys first and in order, then the faces (by default every face is found).
        assert list(record) == [*RECORD_KEYS, "all_probabilities", *FACE_KEYS]
        assert list(record["all_probabilities"]) == list(EMOTIONS)
        image = decode_image(path)
        assert record["image_size"] == list(image.size)
        assert record["faces_found"] is not None and len(record["faces"]) >= 1
        largest = record["faces"][0]
        if record["faces_found"] == 0:  # classified whole, and said so
            assert largest["whole_image"] and largest["box"] == [0, 0, *image.size]
            expected = predictor.predict_images([image])[0]
        else:
            assert not largest["whole_image"] and largest["score"] >= 0.95
            face = Face(tuple(largest["box"]), largest["score"])
            expected = predictor.predict_images([crop_face(image, face, CropSpec())])[0]
        # The image-level fields are the largest face's.
        np.testing.assert_allclose(
            [record["all_probabilities"][e] for e in EMOTIONS], expected, atol=2e-3
        )
        assert record["predicted_emotion"] == largest["predicted_emotion"]
        assert record["predicted_class"] == int(np.argmax(expected))
        assert record["predicted_emotion"] == EMOTIONS[record["predicted_class"]]


def test_infer_prints_json_to_stdout(bundle_dir: Path, images_dir: Path) -> None:
    result = _invoke("infer", "--model", str(bundle_dir), str(images_dir / "a.png"), "--quiet")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["num_images"] == 1
    assert "errors" not in document


def test_infer_summary_on_stderr(bundle_dir: Path, images_dir: Path) -> None:
    result = _invoke("infer", "--model", str(bundle_dir), str(images_dir))
    assert result.exit_code == 0, result.output
    assert "Inference Configuration:" in result.stderr
    assert "Summary:" in result.stderr
    assert "  unreadable: 1" in result.stderr
    assert json.loads(result.stdout)["num_images"] == 3


def test_infer_only_corrupt_files_exits_1(tmp_path: Path, bundle_dir: Path) -> None:
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "one.png").write_bytes(b"garbage")
    (folder / "two.jpg").write_bytes(b"")
    out = tmp_path / "out.json"
    result = _invoke("infer", "--model", str(bundle_dir), str(folder), "--quiet", "-o", str(out))
    assert result.exit_code == 1, result.output
    assert "none of 2 images could be read" in result.stderr
    document = json.loads(out.read_text())
    assert document["num_images"] == 0 and document["num_errors"] == 2


def test_infer_missing_path_exits_2(tmp_path: Path, bundle_dir: Path) -> None:
    missing = tmp_path / "nowhere"
    result = _invoke("infer", "--model", str(bundle_dir), str(missing), "--quiet")
    assert result.exit_code == 2
    assert f"{missing}: no such file or directory" in result.stderr


def test_infer_folder_without_images_exits_2(tmp_path: Path, bundle_dir: Path) -> None:
    (tmp_path / "empty").mkdir()
    result = _invoke("infer", "--model", str(bundle_dir), str(tmp_path / "empty"), "--quiet")
    assert result.exit_code == 2
    assert "no image files found" in result.stderr


def test_infer_missing_model_exits_2(tmp_path: Path, images_dir: Path) -> None:
    model = tmp_path / "no-such-model"
    result = _invoke("infer", "--model", str(model), str(images_dir), "--quiet")
    assert result.exit_code == 2
    assert "does not exist" in result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")
def test_infer_cuda_without_cuda_exits_2(bundle_dir: Path, images_dir: Path) -> None:
    result = _invoke("infer", "--model", str(bundle_dir), "--device", "cuda", str(images_dir))
    assert result.exit_code == 2
    assert "CUDA is not available" in result.stderr


def test_infer_bundle_with_unknown_architecture_exits_2(
    tmp_path: Path, bundle_dir: Path, images_dir: Path
) -> None:
    broken = tmp_path / "bundle"
    broken.mkdir()
    for name in ("model.pt", SPEC_FILE):
        (broken / name).write_bytes((bundle_dir / name).read_bytes())
    document = json.loads((broken / SPEC_FILE).read_text())
    document["architecture"] = "future_net"
    (broken / SPEC_FILE).write_text(json.dumps(document))
    result = _invoke("infer", "--model", str(broken), str(images_dir), "--quiet")
    assert result.exit_code == 2
    assert "future_net" in result.stderr


# -- the CLI's state does not depend on the current folder ------------------------------------


def test_the_default_var_dir_does_not_depend_on_the_current_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`face-emotions models` run from another folder used to start an empty store there."""
    from face_emotions.settings import Settings

    monkeypatch.delenv("EMOTIONS_VAR_DIR", raising=False)
    here = Settings().var_dir
    monkeypatch.chdir(tmp_path)
    assert Settings().var_dir == here
    assert not here.is_relative_to(tmp_path)
    assert here == Path(__file__).resolve().parents[2] / "var", "a checkout keeps its var/"


def test_registry_and_database_commands_say_which_store_they_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from face_emotions.settings import get_settings

    monkeypatch.setenv("EMOTIONS_VAR_DIR", str(tmp_path))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("EMOTIONS_MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    try:
        models = CliRunner().invoke(main, ["models"])
        assert models.exit_code == 0, models.output
        assert f"registry: sqlite:///{tmp_path}/mlflow/mlflow.db" in models.stderr
        assert "no versions of 'face-emotion' registered in this registry" in models.stderr
        db = CliRunner().invoke(main, ["db", "upgrade"])
        assert db.exit_code == 0, db.output
        assert f"sqlite:///{tmp_path}/emotions.db" in db.stderr
        tokens = CliRunner().invoke(main, ["tokens", "list"])
        assert f"database: sqlite:///{tmp_path}/emotions.db" in tokens.stderr
    finally:
        get_settings.cache_clear()


def test_promote_says_which_version_serves_and_which_it_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bundle_dir: Path
) -> None:
    from face_emotions.registry.mlflow_registry import Registry
    from face_emotions.settings import Settings
    from face_emotions.settings import get_settings

    monkeypatch.setenv("EMOTIONS_VAR_DIR", str(tmp_path))
    monkeypatch.setenv("EMOTIONS_BROKER_URL", "memory://")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    get_settings.cache_clear()
    registry = Registry(Settings(var_dir=tmp_path))
    run = registry.client.create_run(registry.experiment_id())
    for _ in range(2):
        registry.publish(bundle_dir, run_id=run.info.run_id, tags={"accuracy": 0.5})
    registry.set_alias(1)
    try:
        result = CliRunner().invoke(main, ["promote", "2"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert "promoted: v2 is now champion (replaces v1): promote=force" in result.stdout
    assert registry.alias_version().version == 2


class FakeJobs:
    """The list endpoint, as far as resolving a short id uses it."""

    def __init__(self, ids: list[str]) -> None:
        self.ids = ids

    def __call__(self, *, limit: int = 20, id_prefix: str | None = None) -> dict:
        found = [i for i in self.ids if i.replace("-", "").startswith(id_prefix or "")]
        return {"items": [{"id": i} for i in found[:limit]], "total": len(found)}


def test_short_job_ids_resolve_to_the_unique_job() -> None:
    from face_emotions.cli.api_client import ApiClientError
    from face_emotions.cli.api_client import EmotionsClient

    ids = ["aee7216c-0000-4000-8000-000000000001", "aee7216d-0000-4000-8000-000000000002",
           "aee7216d-1111-4000-8000-000000000003"]  # fmt: skip
    client = EmotionsClient("http://api.invalid")
    client.jobs = FakeJobs(ids)  # type: ignore[method-assign]
    assert client.resolve("aee7216c") == ids[0]
    assert client.resolve(ids[1]) == ids[1]  # a full id is used as it is
    with pytest.raises(ApiClientError, match="ambiguous: 2 jobs"):
        client.resolve("aee7216d")
    with pytest.raises(ApiClientError, match="no job id starts with"):
        client.resolve("bbbbbbbb")
    with pytest.raises(ApiClientError, match="at least 8 characters"):
        client.resolve("aee72")


def test_uploads_of_folders_are_named_by_their_path_below_the_folder(tmp_path: Path) -> None:
    from face_emotions.cli.jobs import _upload_files

    for emotion in ("Angry", "Fear"):
        (tmp_path / "faces" / emotion).mkdir(parents=True)
        (tmp_path / "faces" / emotion / "0.jpg").write_bytes(b"x")
    (tmp_path / "more").mkdir()
    (tmp_path / "more" / "0.jpg").write_bytes(b"x")
    (tmp_path / "single.png").write_bytes(b"x")

    one = _upload_files((tmp_path / "faces",))
    assert sorted(name for _, name in one) == ["Angry/0.jpg", "Fear/0.jpg"]
    several = _upload_files((tmp_path / "faces", tmp_path / "more", tmp_path / "single.png"))
    assert sorted(name for _, name in several) == [
        "faces/Angry/0.jpg",
        "faces/Fear/0.jpg",
        "more/0.jpg",
        "single.png",
    ]
