"""Every version leaves as it could enter: its ONNX file plus the spec that feeds it.

A trained version's spec is derived from its bundle (RGB, NCHW, ``x / 255`` then the
architecture's mean and std, logits over the five classes in their order); an imported one
leaves with the spec it came with. What :func:`export_version` writes imports back with
``face-emotions models import`` and serves the same predictions.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from face_emotions.labels import EMOTIONS
from face_emotions.modeling.bundle import ONNX_FILE
from face_emotions.modeling.bundle import Bundle
from face_emotions.modeling.bundle import export_onnx_file
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.import_spec import FaceCrop
from face_emotions.modeling.import_spec import ImportSpec
from face_emotions.registry.mlflow_registry import Registry
from face_emotions.registry.mlflow_registry import VersionInfo

SPEC_FILE = "spec.yaml"


@dataclass(frozen=True)
class ExportedVersion:
    version: int
    onnx_path: Path
    spec_path: Path
    spec: ImportSpec


def spec_of(bundle: Bundle, version: VersionInfo) -> ImportSpec:
    """The import spec that serves ``bundle`` exactly as a worker here does."""
    if bundle.imported is not None:
        return bundle.imported
    model_spec = bundle.spec
    return ImportSpec(
        input_size=model_spec.image_size,
        colour="rgb",
        layout="NCHW",
        scale=1.0 / 255.0,
        mean=list(model_spec.mean),
        std=list(model_spec.std),
        output="logits",
        labels=list(EMOTIONS),
        face_crop=FaceCrop(
            faces=model_spec.crop.faces, margin=model_spec.crop.margin, align=model_spec.crop.align
        ),
        source=f"face-emotions {version.name} v{version.version} "
        f"({model_spec.architecture}, trained with face-emotions)",
    )


def export_version(registry: Registry, reference: str | int, directory: Path) -> ExportedVersion:
    """Write ``model.onnx`` and ``spec.yaml`` of a version (number or alias) into ``directory``.

    A trained version registered without its ONNX file is exported from its weights here.
    """
    info = registry.resolve(reference)
    bundle = load_bundle(registry.download(info))
    directory.mkdir(parents=True, exist_ok=True)
    onnx_path = directory / ONNX_FILE
    if bundle.onnx_path is not None:
        onnx_path.write_bytes(bundle.onnx_path.read_bytes())
    else:
        assert bundle.model is not None  # a bundle has weights or an ONNX file
        export_onnx_file(bundle.model, bundle.spec, onnx_path)
    spec = spec_of(bundle, info)
    spec_path = directory / SPEC_FILE
    spec_path.write_text(spec.to_yaml())
    return ExportedVersion(info.version, onnx_path, spec_path, spec)
