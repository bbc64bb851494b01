"""The checks an ONNX model passes before it may become a version: each failure is one line.

A file that reaches the registry is served by every worker; one that fails there (a graph ONNX
Runtime can't load, an input of another size, NaN outputs) fails every job on it. So the
import runs what serving runs, once, on a probe batch, and refuses the model when anything
disagrees with its spec. Nothing here touches the registry: a refused import leaves no trace.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from face_emotions.modeling.import_spec import ImportRefused
from face_emotions.modeling.import_spec import ImportSpec
from face_emotions.modeling.import_spec import LabelMapping
from face_emotions.modeling.import_spec import map_labels
from face_emotions.modeling.import_spec import preprocess

#: Images in the probe batch (random pixels, black, white): enough to catch NaN and shapes.
PROBE_IMAGES = 4
#: How far from 1 a row of declared probabilities may sum.
PROBABILITY_TOLERANCE = 1e-3
#: Every ONNX file begins with field 1 (``ir_version``, a varint): protobuf tag byte 0x08.
ONNX_FIRST_BYTE = b"\x08"


@dataclass(frozen=True)
class CheckedModel:
    """A model that passed every check, with what serving needs to know about it."""

    spec: ImportSpec
    mapping: LabelMapping
    input_name: str
    #: 1 when the graph's batch axis is fixed at one image (served image by image), else None.
    fixed_batch: int | None
    sha256: str
    size_bytes: int


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_model(path: Path, spec: ImportSpec, *, max_bytes: int) -> CheckedModel:
    """Run every import check on ``path``; raise :class:`ImportRefused` at the first failure."""
    mapping = map_labels(spec.labels)
    size = path.stat().st_size
    if size > max_bytes:
        raise ImportRefused(
            f"the ONNX file is {size / 2**20:.1f} MiB, over the import limit of "
            f"{max_bytes / 2**20:.0f} MiB (EMOTIONS_MAX_IMPORT_MB)"
        )
    if size == 0:
        raise ImportRefused("the file is empty, not an ONNX model")
    session = _session(path)
    inputs, outputs = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ImportRefused(f"the model has {len(inputs)} inputs; an image model has exactly one")
    model_input = inputs[0]
    if model_input.type != "tensor(float)":
        raise ImportRefused(f"the model's input is {model_input.type}; float32 is required")
    fixed_batch = _check_input_shape(list(model_input.shape), spec)
    _check_output_shape(list(outputs[0].shape), spec)
    probe = probe_outputs(session, model_input.name, spec, fixed_batch)
    if probe.ndim != 2 or probe.shape[1] != len(spec.labels):
        raise ImportRefused(
            f"the model gives outputs of shape {list(probe.shape)} for {PROBE_IMAGES} images; "
            f"the spec names {len(spec.labels)} labels, so [{PROBE_IMAGES}, {len(spec.labels)}] "
            "was expected"
        )
    if not np.isfinite(probe).all():
        raise ImportRefused("the model gives non-finite outputs (NaN or infinity) on a probe batch")
    if spec.output == "probabilities":
        sums = probe.sum(axis=1)
        if (probe < -PROBABILITY_TOLERANCE).any() or (
            np.abs(sums - 1) > PROBABILITY_TOLERANCE
        ).any():
            raise ImportRefused(
                "the spec says output: probabilities, but the outputs' rows sum to "
                f"{', '.join(f'{s:.3f}' for s in sums)}; set output: logits"
            )
    return CheckedModel(spec, mapping, model_input.name, fixed_batch, file_sha256(path), size)


def _session(path: Path) -> Any:
    """An ONNX Runtime session on CPU; anything it can't load is "not a loadable model"."""
    import onnx
    import onnxruntime as ort

    with path.open("rb") as handle:
        head = handle.read(1)
    if head != ONNX_FIRST_BYTE:
        raise ImportRefused("not an ONNX model: the file does not start as an ONNX ModelProto")
    try:
        # Self-contained files only: external tensor data would be read from beside the file.
        proto = onnx.load(str(path), load_external_data=False)
        onnx.checker.check_model(proto)
    except Exception as exc:
        raise ImportRefused(
            f"not a loadable ONNX model (truncated or corrupt): {_first_line(exc)}"
        ) from exc
    if any(tensor.data_location == onnx.TensorProto.EXTERNAL for tensor in proto.graph.initializer):
        raise ImportRefused("the model keeps weights in external files; import one .onnx file")
    try:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        return ort.InferenceSession(
            proto.SerializeToString(), options, providers=["CPUExecutionProvider"]
        )
    except Exception as exc:
        raise ImportRefused(
            f"not a loadable ONNX model (ONNX Runtime): {_first_line(exc)}"
        ) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]


def _check_input_shape(shape: list[Any], spec: ImportSpec) -> int | None:
    """Compare the graph's input with the spec; symbolic dimensions agree with anything."""
    expected = spec.input_shape()
    if len(shape) != 4 or any(
        isinstance(dim, int) and isinstance(want, int) and dim != want
        for dim, want in zip(shape[1:], expected[1:], strict=True)
    ):
        raise ImportRefused(
            f"the model's input has shape {shape}, the spec describes {expected} "
            f"({spec.layout}, {spec.colour}, {spec.input_size} px)"
        )
    batch = shape[0]
    if isinstance(batch, int) and batch != 1:
        raise ImportRefused(
            f"the model's batch axis is fixed at {batch}; export it with a dynamic batch axis "
            "(or a batch of 1)"
        )
    return 1 if batch == 1 else None


def _check_output_shape(shape: list[Any], spec: ImportSpec) -> None:
    width = shape[-1] if shape else None
    if len(shape) != 2 or (isinstance(width, int) and width != len(spec.labels)):
        raise ImportRefused(
            f"the model's output has shape {shape}; the spec names {len(spec.labels)} labels, "
            f"so [N, {len(spec.labels)}] was expected"
        )


def probe_batch(spec: ImportSpec) -> np.ndarray:
    """A uint8 RGB batch at the model's size: random pixels, then black, then white."""
    rng = np.random.default_rng(0)
    side = spec.input_size
    batch = rng.integers(0, 256, size=(PROBE_IMAGES, side, side, 3), dtype=np.uint8)
    batch[-2], batch[-1] = 0, 255
    return batch


def run_session(
    session: Any, input_name: str, x: np.ndarray, fixed_batch: int | None
) -> np.ndarray:
    """One pass over ``x``, or one per image when the graph's batch axis is fixed at 1."""
    if fixed_batch is None or len(x) <= 1:
        return np.asarray(session.run(None, {input_name: x})[0], dtype=np.float32)
    rows = [session.run(None, {input_name: x[i : i + 1]})[0] for i in range(len(x))]
    return np.concatenate([np.asarray(r, dtype=np.float32) for r in rows])


def probe_outputs(
    session: Any, input_name: str, spec: ImportSpec, fixed_batch: int | None
) -> np.ndarray:
    try:
        return run_session(session, input_name, preprocess(spec, probe_batch(spec)), fixed_batch)
    except Exception as exc:
        raise ImportRefused(
            f"the model fails on a probe batch shaped as the spec says: {_first_line(exc)}"
        ) from exc
