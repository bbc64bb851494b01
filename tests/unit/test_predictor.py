"""Predictor: decoded images in, class probabilities out, the same with either backend."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from face_emotions.data.images import load_batch_array
from face_emotions.data.sample_faces import render_face
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.bundle import ModelSpec
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import save_bundle
from face_emotions.modeling.zoo import create_model
from face_emotions.serving.predictor import Predictor
from face_emotions.serving.predictor import resolve_device

SIZE = 32
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def _random_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model("cnn")
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_(0, 0.1)
            module.running_var.uniform_(0.5, 2.0)
    return model.eval()


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    spec = ModelSpec.for_architecture("cnn", image_size=SIZE)
    return save_bundle(tmp_path_factory.mktemp("predictor") / "bundle", _random_cnn(), spec)


@pytest.fixture(scope="module")
def images() -> list[Image.Image]:
    rng = np.random.default_rng(0)
    faces = [render_face(e, np.random.default_rng(i), size=48) for i, e in enumerate(EMOTIONS)]
    noise = Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8))
    return [face.convert("RGB") for face in faces] + [noise]


def test_probabilities(bundle_dir: Path, images: list[Image.Image]) -> None:
    predictor = Predictor(load_bundle(bundle_dir))
    probs = predictor.predict_images(images)
    assert probs.shape == (len(images), len(EMOTIONS))
    assert probs.dtype == np.float32
    assert (probs >= 0).all() and (probs <= 1).all()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert predictor.image_size == SIZE


def test_matches_a_manual_forward_pass(bundle_dir: Path, images: list[Image.Image]) -> None:
    bundle = load_bundle(bundle_dir)
    reference = load_bundle(bundle_dir).model
    batch = load_batch_array(images, SIZE).astype(np.float32) / 255.0
    mean = np.array(bundle.spec.mean, dtype=np.float32)
    std = np.array(bundle.spec.std, dtype=np.float32)
    x = torch.from_numpy(((batch - mean) / std).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        expected = torch.softmax(reference(x), dim=1).numpy()
    probs = Predictor(bundle, channels_last=False).predict_images(images)
    np.testing.assert_allclose(probs, expected, atol=1e-5)


def test_empty_input(bundle_dir: Path) -> None:
    probs = Predictor(load_bundle(bundle_dir)).predict_images([])
    assert probs.shape == (0, len(EMOTIONS))
    assert probs.dtype == np.float32


def test_torch_and_onnx_backends_agree(bundle_dir: Path, images: list[Image.Image]) -> None:
    torch_probs = Predictor(load_bundle(bundle_dir), backend="torch").predict_images(images)
    onnx = Predictor(load_bundle(bundle_dir), backend="onnx")
    onnx_probs = onnx.predict_images(images)
    assert onnx_probs.shape == torch_probs.shape
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(onnx_probs.sum(axis=1), 1.0, atol=1e-5)
    single = onnx.predict_images(images[:1])  # dynamic batch axis
    np.testing.assert_allclose(single, torch_probs[:1], atol=1e-4, rtol=0)


def test_onnx_backend_needs_the_artefact(tmp_path: Path) -> None:
    spec = ModelSpec.for_architecture("cnn", image_size=SIZE)
    directory = save_bundle(tmp_path / "bundle", _random_cnn(), spec, export_onnx=False)
    with pytest.raises(RuntimeError, match="no ONNX artefact"):
        Predictor(load_bundle(directory), backend="onnx")


def test_normalise_matches_per_image_computation(bundle_dir: Path) -> None:
    predictor = Predictor(load_bundle(bundle_dir))
    rng = np.random.default_rng(3)
    batch = rng.integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    out = predictor.normalise(batch)
    assert out.shape == (3, 3, SIZE, SIZE)
    assert out.dtype == torch.float32
    mean, std = predictor.spec.mean, predictor.spec.std
    assert len(set(mean)) == 3  # per-channel constants differ, so a channel mix-up would show
    for n in range(batch.shape[0]):
        for c in range(3):
            expected = (batch[n, :, :, c].astype(np.float64) / 255.0 - mean[c]) / std[c]
            np.testing.assert_allclose(out[n, c].numpy(), expected, atol=1e-5, rtol=0)


def test_channels_last_on_and_off_agree(bundle_dir: Path, images: list[Image.Image]) -> None:
    # Separate bundles: Predictor converts the bundle's model in place.
    on = Predictor(load_bundle(bundle_dir), channels_last=True)
    off = Predictor(load_bundle(bundle_dir), channels_last=False)
    assert on.model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert off.model.features[0].weight.is_contiguous()
    np.testing.assert_allclose(
        on.predict_images(images), off.predict_images(images), atol=1e-5, rtol=0
    )


def test_predict_array_is_deterministic(bundle_dir: Path, images: list[Image.Image]) -> None:
    predictor = Predictor(load_bundle(bundle_dir))
    batch = predictor.batch_array(images)
    assert batch.shape == (len(images), SIZE, SIZE, 3) and batch.dtype == np.uint8
    np.testing.assert_array_equal(predictor.predict_array(batch), predictor.predict_array(batch))


@no_cuda
@pytest.mark.parametrize("requested", ["cuda", "cuda:0"])
def test_cuda_without_cuda_is_an_error(requested: str) -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        resolve_device(requested)


@no_cuda
def test_predictor_refuses_cuda_without_cuda(bundle_dir: Path) -> None:
    with pytest.raises(RuntimeError, match="CUDA is not available"):
        Predictor(load_bundle(bundle_dir), device="cuda")


@no_cuda
def test_auto_is_cpu_here() -> None:
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device() == torch.device("cpu")


def test_explicit_cpu() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
