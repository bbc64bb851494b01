"""The model artefact every service exchanges: weights plus everything needed to use them.

A bundle is a directory with ``model.json`` (architecture, image size, normalisation, class list,
metadata), ``model.pt`` (a plain state dict) and optionally ``model.onnx``. It is what training
registers in MLflow and what workers load, so inference never depends on how training was run
(no pickled Lightning module, no torch.export with its fixed image size).

An *imported* bundle (a model trained elsewhere, ``kind: onnx-import``) has ``model.onnx`` and
no weights: its ``model.json`` carries the :class:`~face_emotions.modeling.import_spec.ImportSpec`
that says how to feed it and read its outputs, and it is served by ONNX Runtime only.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from face_emotions.faces.crop import CropSpec
from face_emotions.labels import EMOTIONS
from face_emotions.modeling.import_spec import ImportSpec
from face_emotions.modeling.import_spec import map_labels
from face_emotions.modeling.import_spec import parse_spec
from face_emotions.modeling.zoo import DEFAULT_DROPOUT
from face_emotions.modeling.zoo import create_model
from face_emotions.modeling.zoo import get_architecture

SPEC_FILE = "model.json"
WEIGHTS_FILE = "model.pt"
ONNX_FILE = "model.onnx"
PROBE_FILE = "probe.npz"
FORMAT_VERSION = 1
#: ``model.json``'s ``kind`` (and the ``architecture`` tag) of a version imported as ONNX.
IMPORTED_KIND = "onnx-import"


class BundleError(ValueError):
    """A bundle or checkpoint is missing, incomplete or for a different class list."""


@dataclass(frozen=True)
class ModelSpec:
    """How to build the network and feed it: the preprocessing contract of a trained model."""

    architecture: str
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    classes: tuple[str, ...] = EMOTIONS
    dropout: float = DEFAULT_DROPOUT
    options: dict[str, Any] = field(default_factory=dict)
    #: How the training images were cut from photos; serving crops faces the same way.
    crop: CropSpec = field(default_factory=CropSpec)

    @classmethod
    def for_architecture(
        cls,
        architecture: str,
        image_size: int | None = None,
        *,
        dropout: float = DEFAULT_DROPOUT,
        options: dict[str, Any] | None = None,
        crop: CropSpec | None = None,
    ) -> ModelSpec:
        arch = get_architecture(architecture)
        return cls(
            architecture=architecture,
            image_size=image_size or arch.default_image_size,
            mean=arch.mean,
            std=arch.std,
            dropout=dropout,
            options=dict(options or {}),
            crop=crop or CropSpec(),
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        try:
            spec = cls(
                architecture=str(data["architecture"]),
                image_size=int(data["image_size"]),
                mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
                std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
                classes=tuple(data.get("classes", EMOTIONS)),
                dropout=float(data.get("dropout", DEFAULT_DROPOUT)),
                options=dict(data.get("options") or {}),
                crop=CropSpec.from_dict(data.get("crop")),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"invalid model spec {data!r}: {exc}") from exc
        try:
            get_architecture(spec.architecture)
        except ValueError as exc:
            raise BundleError(f"model spec names an unknown architecture: {exc}") from exc
        if spec.classes != EMOTIONS:
            raise BundleError(
                f"model predicts classes {list(spec.classes)}, "
                f"this service expects {list(EMOTIONS)}"
            )
        return spec

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["mean"], data["std"], data["classes"] = (
            list(self.mean),
            list(self.std),
            list(self.classes),
        )
        data["crop"] = self.crop.to_dict()
        return data

    def build(self) -> nn.Module:
        return create_model(
            self.architecture, pretrained=False, dropout=self.dropout, **self.options
        )


@dataclass
class Bundle:
    spec: ModelSpec
    #: None for an imported version: it exists only as its ONNX file.
    model: nn.Module | None
    metadata: dict[str, Any] = field(default_factory=dict)
    onnx_path: Path | None = None
    #: The preprocessing and label contract of an imported version (None: trained here).
    imported: ImportSpec | None = None
    #: The static INT8 variant, present only when it passed its accuracy gate.
    int8_onnx_path: Path | None = None
    #: The gate's figures (``GateReport.to_dict``), passed or failed; None: never quantised.
    int8_gate: dict[str, Any] | None = None
    #: Test images (uint8 NHWC at the model's size) on which a worker checks that a faster
    #: backend (INT8, BF16) agrees with fp32 before choosing it; None in older versions.
    probe_path: Path | None = None

    def probe_images(self) -> Any:
        """The probe images as a uint8 array, or None when the version has none."""
        if self.probe_path is None:
            return None
        import numpy as np

        with np.load(self.probe_path) as data:
            return data["images"]


def save_imported_bundle(
    directory: str | Path,
    onnx_file: Path,
    spec: ImportSpec,
    *,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write an imported model as a bundle: its ONNX file plus the spec that feeds it."""
    import shutil

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(onnx_file, directory / ONNX_FILE)
    document = {
        "format_version": FORMAT_VERSION,
        "kind": IMPORTED_KIND,
        "architecture": IMPORTED_KIND,
        "image_size": spec.input_size,
        "classes": list(EMOTIONS),
        "crop": spec.face_crop.crop_spec().to_dict(),
        "import_spec": spec.model_dump(mode="json"),
        "label_mapping": map_labels(spec.labels).to_dict(),
        "onnx": ONNX_FILE,
        "metadata": metadata or {},
    }
    (directory / SPEC_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    return directory


def _load_imported(directory: Path, document: dict[str, Any]) -> Bundle:
    from face_emotions.modeling.import_spec import ImportRefused

    try:
        imported = parse_spec(document.get("import_spec"))
    except ImportRefused as exc:
        raise BundleError(f"{directory}: {exc}") from exc
    onnx_path = directory / str(document.get("onnx") or ONNX_FILE)
    if not onnx_path.is_file():
        raise BundleError(f"{directory} is an imported model without its {ONNX_FILE}")
    spec = ModelSpec(
        architecture=IMPORTED_KIND,
        image_size=imported.input_size,
        mean=(0.0, 0.0, 0.0),  # unused: the import spec normalises
        std=(1.0, 1.0, 1.0),
        crop=imported.face_crop.crop_spec(),
    )
    return Bundle(spec, None, document.get("metadata", {}), onnx_path, imported)


def save_bundle(
    directory: str | Path,
    model: nn.Module,
    spec: ModelSpec,
    *,
    metadata: dict[str, Any] | None = None,
    export_onnx: bool = True,
) -> Path:
    """Write ``model`` as a bundle; ONNX export gives workers a fast CPU backend."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save(state, directory / WEIGHTS_FILE)
    document = {
        "format_version": FORMAT_VERSION,
        **spec.to_dict(),
        "metadata": metadata or {},
    }
    if export_onnx:
        export_onnx_file(model, spec, directory / ONNX_FILE)
        document["onnx"] = ONNX_FILE
    (directory / SPEC_FILE).write_text(json.dumps(document, indent=2, sort_keys=True))
    return directory


def export_onnx_file(model: nn.Module, spec: ModelSpec, path: Path) -> Path:
    """Export with a dynamic batch axis; the image size is fixed by the spec anyway."""
    import copy

    exportable = copy.deepcopy(model).cpu().eval()
    example = torch.zeros(1, 3, spec.image_size, spec.image_size)
    with torch.no_grad():
        torch.onnx.export(
            exportable,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            dynamo=False,
        )
    return path


def load_bundle(directory: str | Path, *, map_location: str | torch.device = "cpu") -> Bundle:
    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    if not spec_path.is_file():
        raise BundleError(f"{directory} is not a model bundle: {SPEC_FILE} is missing")
    try:
        document = json.loads(spec_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{spec_path} is not valid JSON: {exc}") from exc
    if document.get("kind") == IMPORTED_KIND:
        return _load_imported(directory, document)
    spec = ModelSpec.from_dict(document)
    weights = directory / WEIGHTS_FILE
    if not weights.is_file():
        raise BundleError(f"{directory} is not a model bundle: {WEIGHTS_FILE} is missing")
    model = spec.build()
    model.load_state_dict(torch.load(weights, map_location=map_location, weights_only=True))
    model.eval()
    int8 = document.get("int8") or {}
    return Bundle(
        spec,
        model,
        document.get("metadata", {}),
        _optional_file(directory, document.get("onnx")),
        int8_onnx_path=_optional_file(directory, int8.get("onnx")),
        int8_gate=int8.get("gate"),
        probe_path=_optional_file(directory, document.get("probe")),
    )


def _optional_file(directory: Path, name: str | None) -> Path | None:
    return directory / name if name and (directory / name).is_file() else None


def record_variants(
    directory: str | Path,
    *,
    int8_file: str | None,
    int8_gate: dict[str, Any] | None,
    probe_images: Any = None,
) -> None:
    """Add the INT8 variant (``int8_file``: its name in the bundle, None when it failed its
    gate) with the gate's figures, and the probe images, to a saved bundle's ``model.json``."""
    import numpy as np

    directory = Path(directory)
    spec_path = directory / SPEC_FILE
    document = json.loads(spec_path.read_text())
    if int8_gate is not None:
        document["int8"] = {"onnx": int8_file, "gate": int8_gate}
    if probe_images is not None:
        np.savez_compressed(directory / PROBE_FILE, images=np.asarray(probe_images, np.uint8))
        document["probe"] = PROBE_FILE
    spec_path.write_text(json.dumps(document, indent=2, sort_keys=True))


def load_checkpoint(path: str | Path, *, map_location: str | torch.device = "cpu") -> Bundle:
    """Load a Lightning checkpoint written by :mod:`training` without importing Lightning."""
    path = Path(path)
    if not path.is_file():
        raise BundleError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise BundleError(f"cannot read checkpoint {path}: {exc}") from exc
    if not isinstance(checkpoint, dict):
        raise BundleError(f"{path} is not a Lightning checkpoint ({type(checkpoint).__name__})")
    hparams = checkpoint.get("hyper_parameters") or {}
    if "spec" not in hparams or "state_dict" not in checkpoint:
        raise BundleError(f"{path} was not written by face-emotions training (no model spec)")
    spec = ModelSpec.from_dict(dict(hparams["spec"]))
    prefix = "model."
    state = {
        k[len(prefix) :]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)
    }
    model = spec.build()
    model.load_state_dict(state)
    model.eval()
    return Bundle(spec, model, {"checkpoint": str(path)})


def load_model_source(source: str | Path, *, map_location: str | torch.device = "cpu") -> Bundle:
    """A checkpoint file, a bundle directory, or a ``models:/`` / ``runs:/`` MLflow URI."""
    text = str(source)
    if text.startswith(("models:/", "runs:/")):
        from face_emotions.registry.mlflow_registry import download_bundle

        return load_bundle(download_bundle(text), map_location=map_location)
    path = Path(text)
    if path.is_dir():
        return load_bundle(path, map_location=map_location)
    return load_checkpoint(path, map_location=map_location)
