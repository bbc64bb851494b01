"""A static INT8 variant of a version's ONNX model, published only behind an accuracy gate.

Static QDQ quantisation (per-channel INT8 weights, UINT8 activations calibrated with MinMax)
roughly doubles ONNX Runtime's CPU throughput on CPUs with VNNI. What it costs in accuracy
depends on the model and on the calibration images, so a variant is only published when it
passes :class:`Int8Gate` on the version's *test* split: calibrating on training images and
judging on test images is what keeps the gate honest (a variant calibrated on the images it is
judged on can look better than it is).

A failed gate is recorded with its figures, never hidden: the version still serves in fp32.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from face_emotions.labels import EMOTIONS

log = logging.getLogger(__name__)

#: File name of the INT8 variant inside a bundle.
INT8_ONNX_FILE = "model.int8.onnx"
#: Registry tag of a version's gate outcome: ``passed``, ``failed`` or ``none`` (not attempted).
TAG_INT8 = "int8_gate"


@dataclass(frozen=True)
class Int8Gate:
    """What an INT8 variant may lose against its fp32 model on the test split."""

    #: Accuracy drop, as a fraction (0.005 = half a point).
    max_accuracy_drop: float = 0.005
    #: Largest drop of any class's recall, as a fraction.
    max_recall_drop: float = 0.01
    #: Share of test images whose top-1 class is the same as fp32's.
    min_agreement: float = 0.98


@dataclass
class GateReport:
    """The gate's figures for one version; stored with the version whatever the outcome."""

    passed: bool
    accuracy_fp32: float
    accuracy_int8: float
    agreement: float
    recall_drops: dict[str, float]
    calibration_images: int
    test_images: int
    failures: list[str] = field(default_factory=list)
    gate: dict[str, float] = field(default_factory=dict)

    @property
    def accuracy_drop(self) -> float:
        return self.accuracy_fp32 - self.accuracy_int8

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["accuracy_drop"] = round(self.accuracy_drop, 6)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GateReport:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def summary(self) -> str:
        verdict = "passed" if self.passed else "FAILED (" + "; ".join(self.failures) + ")"
        return (
            f"INT8 gate {verdict}: accuracy {self.accuracy_fp32:.4f} -> {self.accuracy_int8:.4f}"
            f" (drop {100 * self.accuracy_drop:.2f} pt), top-1 agreement"
            f" {100 * self.agreement:.2f} %, worst recall drop"
            f" {100 * max(self.recall_drops.values(), default=0.0):.2f} pt"
        )


def _recalls(y_true: np.ndarray, predicted: np.ndarray) -> dict[str, float]:
    """Recall per class; a class with no test image has no recall to lose (None is skipped)."""
    recalls = {}
    for index, name in enumerate(EMOTIONS):
        mask = y_true == index
        if mask.any():
            recalls[name] = float((predicted[mask] == index).mean())
    return recalls


def judge(
    y_true: np.ndarray,
    fp32: np.ndarray,
    int8: np.ndarray,
    gate: Int8Gate,
    *,
    calibration_images: int,
) -> GateReport:
    """Compare top-1 predictions of the two models (an unreadable image is -1 in both)."""
    if not len(y_true):
        raise ValueError("the INT8 gate needs at least one test image")
    accuracy_fp32 = float((fp32 == y_true).mean())
    accuracy_int8 = float((int8 == y_true).mean())
    agreement = float((fp32 == int8).mean())
    before, after = _recalls(y_true, fp32), _recalls(y_true, int8)
    recall_drops = {name: round(before[name] - after[name], 6) for name in before}
    failures = []
    if accuracy_fp32 - accuracy_int8 > gate.max_accuracy_drop + 1e-9:
        failures.append(
            f"accuracy drops {100 * (accuracy_fp32 - accuracy_int8):.2f} pt "
            f"(at most {100 * gate.max_accuracy_drop:.2f})"
        )
    worst = max(recall_drops, key=lambda name: recall_drops[name])
    if recall_drops[worst] > gate.max_recall_drop + 1e-9:
        failures.append(
            f"{worst} recall drops {100 * recall_drops[worst]:.2f} pt "
            f"(at most {100 * gate.max_recall_drop:.2f})"
        )
    if agreement < gate.min_agreement - 1e-9:
        failures.append(
            f"top-1 agreement with fp32 {100 * agreement:.2f} % "
            f"(at least {100 * gate.min_agreement:.2f})"
        )
    return GateReport(
        passed=not failures,
        accuracy_fp32=round(accuracy_fp32, 6),
        accuracy_int8=round(accuracy_int8, 6),
        agreement=round(agreement, 6),
        recall_drops=recall_drops,
        calibration_images=calibration_images,
        test_images=len(y_true),
        failures=failures,
        gate=asdict(gate),
    )


class _Batches:
    """ONNX Runtime's calibration reader over float32 model inputs (N, ...)."""

    def __init__(self, input_name: str, inputs: np.ndarray, batch_size: int = 16) -> None:
        self._batches: Iterator[np.ndarray] = iter(
            [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
        )
        self._input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self._batches, None)
        return None if batch is None else {self._input_name: batch}


def quantize(fp32_onnx: Path, output: Path, calibration_inputs: np.ndarray) -> Path:
    """Write a static INT8 (QDQ) copy of ``fp32_onnx`` calibrated on ``calibration_inputs``.

    ``calibration_inputs`` are float32 model inputs, preprocessed exactly as serving feeds the
    fp32 model. Shape inference and graph clean-up run first, as ONNX Runtime recommends for
    static quantisation (fused BatchNorm, folded constants: fewer QDQ pairs, better accuracy).
    """
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod
    from onnxruntime.quantization import QuantFormat
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if not len(calibration_inputs):
        raise ValueError("INT8 calibration needs at least one image")
    session = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    with tempfile.TemporaryDirectory(prefix="int8-") as scratch:
        prepared = Path(scratch) / "prepared.onnx"
        quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=True)
        quantize_static(
            str(prepared),
            str(output),
            _Batches(name, np.ascontiguousarray(calibration_inputs, dtype=np.float32)),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            # 7-bit weights: on x86 CPUs without VNNI (AVX2, AVX512F) ONNX Runtime's u8*s8
            # kernels sum pairs of products in 16 bits, which saturate with 8-bit weights (the
            # gate measured 4.5 points lost on such a CPU). The variant is made once and served
            # wherever workers run, so it is made to hold on both kinds of CPU.
            reduce_range=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
    log.info("INT8 variant calibrated on %d images: %s", len(calibration_inputs), output)
    return output
