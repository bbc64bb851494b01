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
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.bundle import SPEC_FILE
from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import save_bundle
from face_emotions.modeling.zoo import create_model
from face_emotions.serving.predictor import Predictor

RECORD_KEYS = ["image_path", "predicted_class", "predicted_emotion", "confidence"]


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
    probs = predictor.predict_images([decode_image(p) for p in expected_paths])
    for record, row in zip(predictions, probs, strict=True):
        assert list(record) == [*RECORD_KEYS, "all_probabilities"]
        assert list(record["all_probabilities"]) == list(EMOTIONS)
        np.testing.assert_allclose(
            [record["all_probabilities"][e] for e in EMOTIONS], row, atol=1e-4
        )
        assert record["predicted_class"] == int(np.argmax(row))
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
