"""Small torch models exported to ONNX as public FER models are: 7 or 8 outputs, gray or RGB,
NCHW or NHWC, with the spec that describes each (tests of importing and serving them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from face_emotions.modeling.import_spec import ImportSpec

FER7 = ["angry", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
FER8 = ["neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fearful", "contempt"]


class TinyFer(nn.Module):
    """conv -> pooled features -> linear; ``nhwc`` takes channels-last input as TF exports do."""

    def __init__(self, channels: int, outputs: int, *, nhwc: bool, nan: bool = False) -> None:
        super().__init__()
        self.nhwc, self.nan = nhwc, nan
        self.conv = nn.Conv2d(channels, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(4)
        self.head = nn.Linear(8 * 16, outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.nhwc:
            x = x.permute(0, 3, 1, 2)
        logits = self.head(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))
        if self.nan:
            logits = logits * torch.sqrt(logits.new_full((1,), -1.0))
        return logits


def export(model: nn.Module, spec: ImportSpec, path: Path, *, softmax: bool = False) -> Path:
    """Export with a dynamic batch axis, opset 17, one self-contained file."""
    module: nn.Module = nn.Sequential(model, nn.Softmax(dim=1)) if softmax else model
    example = torch.zeros(*[2 if d == "N" else d for d in spec.input_shape()])  # type: ignore[misc]
    torch.onnx.export(
        module.eval(),
        (example,),
        str(path),
        input_names=["input"],
        output_names=["output"],
        dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
        opset_version=17,
        dynamo=False,
    )
    return path


def make_model(
    tmp: Path,
    *,
    labels: list[str] | None = None,
    size: int = 48,
    colour: str = "gray",
    layout: str = "NCHW",
    output: str = "logits",
    seed: int = 0,
    nan: bool = False,
    **spec_fields: Any,
) -> tuple[Path, ImportSpec]:
    """An exported model and its spec; ``spec_fields`` override the spec (not the model)."""
    labels = labels or FER7
    spec = ImportSpec(
        input_size=size,
        colour=colour,  # type: ignore[arg-type]
        layout=layout,  # type: ignore[arg-type]
        output=output,  # type: ignore[arg-type]
        labels=labels,
        mean=[0.5] if colour == "gray" else [0.5, 0.4, 0.3],
        std=[0.25] if colour == "gray" else [0.2, 0.25, 0.3],
        source="tests: random weights",
    )
    torch.manual_seed(seed)
    model = TinyFer(spec.channels, len(labels), nhwc=layout == "NHWC", nan=nan)
    name = f"fer{len(labels)}-{colour}-{layout}-{size}-{seed}{'-nan' if nan else ''}.onnx"
    path = export(model, spec, tmp / name, softmax=output == "probabilities")
    if spec_fields:
        spec = spec.model_copy(update=spec_fields)
    return path, spec
