"""Bundles and checkpoints: the model artefact every service exchanges."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from timm.data import IMAGENET_DEFAULT_MEAN
from timm.data import IMAGENET_DEFAULT_STD
from torch import nn

from face_emotions.labels import EMOTIONS
from face_emotions.modeling.bundle import FORMAT_VERSION
from face_emotions.modeling.bundle import ONNX_FILE
from face_emotions.modeling.bundle import SPEC_FILE
from face_emotions.modeling.bundle import WEIGHTS_FILE
from face_emotions.modeling.bundle import BundleError
from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import load_checkpoint
from face_emotions.modeling.bundle import load_model_source
from face_emotions.modeling.bundle import save_bundle
from face_emotions.modeling.zoo import create_model

SIZE = 32


def _random_cnn(seed: int = 0) -> nn.Module:
    """A cnn whose BatchNorm buffers are not the defaults, so a round trip must carry them."""
    torch.manual_seed(seed)
    model = create_model("cnn")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


@pytest.fixture
def spec() -> ModelSpec:
    return ModelSpec.for_architecture("cnn", image_size=SIZE)


@pytest.fixture
def model() -> nn.Module:
    return _random_cnn()


@pytest.fixture
def inputs() -> torch.Tensor:
    return torch.randn(3, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_spec_for_architecture(spec: ModelSpec) -> None:
    assert spec.architecture == "cnn"
    assert spec.image_size == SIZE
    assert spec.mean == IMAGENET_DEFAULT_MEAN and spec.std == IMAGENET_DEFAULT_STD
    assert spec.classes == EMOTIONS
    assert ModelSpec.for_architecture("cnn").image_size == 128  # the architecture's default
    lite0 = ModelSpec.for_architecture("efficientnet_lite0")
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5)


def test_spec_dict_round_trip(spec: ModelSpec) -> None:
    data = spec.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["classes"] == list(EMOTIONS)
    assert ModelSpec.from_dict(data) == spec


def test_save_and_load_round_trip(
    tmp_path: Path, model: nn.Module, spec: ModelSpec, inputs: torch.Tensor
) -> None:
    directory = save_bundle(
        tmp_path / "bundle", model, spec, metadata={"run": "abc", "acc": 0.5}, export_onnx=False
    )
    assert directory == tmp_path / "bundle"
    assert sorted(p.name for p in directory.iterdir()) == [SPEC_FILE, WEIGHTS_FILE]
    document = json.loads((directory / SPEC_FILE).read_text())
    assert document["format_version"] == FORMAT_VERSION
    assert document["architecture"] == "cnn"
    assert document["image_size"] == SIZE
    assert document["classes"] == list(EMOTIONS)
    assert "onnx" not in document

    bundle = load_bundle(directory)
    assert bundle.spec == spec
    assert bundle.metadata == {"run": "abc", "acc": 0.5}
    assert bundle.onnx_path is None
    assert not bundle.model.training
    assert torch.equal(_outputs(bundle.model, inputs), _outputs(model, inputs))
    for key, value in model.state_dict().items():
        assert torch.equal(bundle.model.state_dict()[key], value), key


def test_onnx_export_matches_torch(
    tmp_path: Path, model: nn.Module, spec: ModelSpec, inputs: torch.Tensor
) -> None:
    import onnxruntime as ort

    directory = save_bundle(tmp_path / "bundle", model, spec)
    assert json.loads((directory / SPEC_FILE).read_text())["onnx"] == ONNX_FILE
    bundle = load_bundle(directory)
    assert bundle.onnx_path == directory / ONNX_FILE
    assert bundle.onnx_path.stat().st_size > 0

    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    expected = _outputs(model, inputs).numpy()
    # The batch axis is dynamic: 3 images although the export example had 1.
    (logits,) = session.run(None, {"images": inputs.numpy()})
    assert logits.shape == (3, len(EMOTIONS))
    np.testing.assert_allclose(logits, expected, atol=1e-4, rtol=0)
    (single,) = session.run(None, {"images": inputs[:1].numpy()})
    np.testing.assert_allclose(single, expected[:1], atol=1e-4, rtol=0)


def test_export_does_not_touch_the_training_model(
    tmp_path: Path, model: nn.Module, spec: ModelSpec
) -> None:
    model.train()
    save_bundle(tmp_path / "bundle", model, spec)
    assert model.training  # exported from a copy put in eval mode, not the caller's model


def test_missing_onnx_file_is_tolerated(tmp_path: Path, model: nn.Module, spec: ModelSpec) -> None:
    directory = save_bundle(tmp_path / "bundle", model, spec)
    (directory / ONNX_FILE).unlink()
    assert load_bundle(directory).onnx_path is None


def test_missing_spec_file(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match=r"not a model bundle: model\.json is missing"):
        load_bundle(tmp_path / "empty")


def test_missing_weights_file(tmp_path: Path, model: nn.Module, spec: ModelSpec) -> None:
    directory = save_bundle(tmp_path / "bundle", model, spec, export_onnx=False)
    (directory / WEIGHTS_FILE).unlink()
    with pytest.raises(BundleError, match=r"not a model bundle: model\.pt is missing"):
        load_bundle(directory)


def test_invalid_json(tmp_path: Path) -> None:
    (tmp_path / SPEC_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="is not valid JSON"):
        load_bundle(tmp_path)


def test_incomplete_spec(tmp_path: Path, spec: ModelSpec) -> None:
    data = spec.to_dict()
    del data["image_size"]
    with pytest.raises(BundleError, match="invalid model spec"):
        ModelSpec.from_dict(data)


@pytest.mark.parametrize(
    "classes",
    [
        list(reversed(EMOTIONS)),
        [*EMOTIONS, "Disgust"],
        ["Angry", "Fear", "Happy", "Sad"],
    ],
)
def test_spec_for_other_classes_is_rejected(
    tmp_path: Path, model: nn.Module, spec: ModelSpec, classes: list[str]
) -> None:
    directory = save_bundle(tmp_path / "bundle", model, spec, export_onnx=False)
    document = json.loads((directory / SPEC_FILE).read_text())
    document["classes"] = classes
    (directory / SPEC_FILE).write_text(json.dumps(document))
    with pytest.raises(BundleError, match="this service expects") as info:
        load_bundle(directory)
    assert str(list(EMOTIONS)) in str(info.value)


def test_unknown_architecture_in_bundle_is_a_bundle_error(
    tmp_path: Path, model: nn.Module, spec: ModelSpec
) -> None:
    directory = save_bundle(tmp_path / "bundle", model, spec, export_onnx=False)
    document = json.loads((directory / SPEC_FILE).read_text())
    document["architecture"] = "future_net"
    (directory / SPEC_FILE).write_text(json.dumps(document))
    with pytest.raises(BundleError, match="future_net"):
        load_bundle(directory)


# --- Lightning-style checkpoints -------------------------------------------------------------


def _write_checkpoint(path: Path, model: nn.Module, spec: ModelSpec | None) -> Path:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    state["criterion.weight"] = torch.ones(len(EMOTIONS))  # not the model's: must be ignored
    hparams = {"lr": 1e-3}
    if spec is not None:
        hparams["spec"] = spec.to_dict()
    torch.save({"epoch": 3, "hyper_parameters": hparams, "state_dict": state}, path)
    return path


def test_load_checkpoint(
    tmp_path: Path, model: nn.Module, spec: ModelSpec, inputs: torch.Tensor
) -> None:
    path = _write_checkpoint(tmp_path / "best.ckpt", model, spec)
    bundle = load_checkpoint(path)
    assert bundle.spec == spec
    assert bundle.metadata == {"checkpoint": str(path)}
    assert bundle.onnx_path is None
    assert not bundle.model.training
    assert torch.equal(_outputs(bundle.model, inputs), _outputs(model, inputs))


def test_checkpoint_without_spec(tmp_path: Path, model: nn.Module) -> None:
    path = _write_checkpoint(tmp_path / "other.ckpt", model, None)
    with pytest.raises(BundleError, match="no model spec"):
        load_checkpoint(path)


def test_plain_state_dict_is_not_a_checkpoint(tmp_path: Path, model: nn.Module) -> None:
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(BundleError, match="no model spec"):
        load_checkpoint(path)


def test_missing_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")


def test_unreadable_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "garbage.ckpt"
    path.write_bytes(b"definitely not a torch file")
    with pytest.raises(BundleError, match="cannot read checkpoint"):
        load_checkpoint(path)


def test_non_dict_checkpoint_is_a_bundle_error(tmp_path: Path) -> None:
    path = tmp_path / "tensor.ckpt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(BundleError):
        load_checkpoint(path)


# --- load_model_source dispatch --------------------------------------------------------------


def test_source_directory_is_loaded_as_bundle(
    tmp_path: Path, model: nn.Module, spec: ModelSpec, inputs: torch.Tensor
) -> None:
    directory = save_bundle(
        tmp_path / "bundle", model, spec, metadata={"kind": "bundle"}, export_onnx=False
    )
    for source in (directory, str(directory)):
        bundle = load_model_source(source)
        assert bundle.metadata == {"kind": "bundle"}
        assert torch.equal(_outputs(bundle.model, inputs), _outputs(model, inputs))


def test_source_file_is_loaded_as_checkpoint(
    tmp_path: Path, model: nn.Module, spec: ModelSpec, inputs: torch.Tensor
) -> None:
    path = _write_checkpoint(tmp_path / "best.ckpt", model, spec)
    bundle = load_model_source(str(path))
    assert bundle.metadata == {"checkpoint": str(path)}
    assert torch.equal(_outputs(bundle.model, inputs), _outputs(model, inputs))


def test_source_missing_path(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="does not exist"):
        load_model_source(tmp_path / "missing")


def test_source_model_uri_goes_through_the_registry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, model: nn.Module, spec: ModelSpec
) -> None:
    directory = save_bundle(
        tmp_path / "bundle", model, spec, metadata={"kind": "mlflow"}, export_onnx=False
    )
    asked: list[str] = []

    def fake_download(uri: str) -> Path:
        asked.append(uri)
        return directory

    monkeypatch.setattr("face_emotions.registry.mlflow_registry.download_bundle", fake_download)
    assert load_model_source("models:/face-emotion@champion").metadata == {"kind": "mlflow"}
    assert load_model_source("runs:/abc/model").metadata == {"kind": "mlflow"}
    assert asked == ["models:/face-emotion@champion", "runs:/abc/model"]
