"""At registration: the version's INT8 variant behind its gate, and its probe images.

Calibration images are a seeded sample of the *training* split; the gate judges the variant on
the *test* split against the fp32 ONNX model, both run on one decode of each test image. The
bundle gets ``model.int8.onnx`` only when the gate passed, and the gate's figures either way.
The probe images (the first test images, at the model's input size) let a worker check, at
load, that any faster backend it measures (INT8, bf16) still agrees with fp32.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from face_emotions.data.labelled_folder import LabelledImage
from face_emotions.modeling.bundle import load_bundle
from face_emotions.modeling.bundle import record_variants
from face_emotions.modeling.int8 import INT8_ONNX_FILE
from face_emotions.modeling.int8 import TAG_INT8
from face_emotions.modeling.int8 import GateReport
from face_emotions.modeling.int8 import Int8Gate
from face_emotions.modeling.int8 import judge
from face_emotions.modeling.int8 import quantize
from face_emotions.serving.decode_ahead import iter_decoded_batches
from face_emotions.serving.folder_evaluation import predict_items_with
from face_emotions.serving.predictor import Predictor

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Int8Options:
    enabled: bool = True
    calibration_images: int = 64
    gate: Int8Gate = field(default_factory=Int8Gate)
    probe_images: int = 64
    seed: int = 0


def decoded_arrays(
    items: Sequence[LabelledImage], predictor: Predictor, *, batch_size: int = 64
) -> np.ndarray:
    """The readable ones among ``items`` as one uint8 NHWC array at the model's size."""
    arrays = []
    for batch in iter_decoded_batches([item.path for item in items], batch_size):
        if batch.images:
            arrays.append(predictor.batch_array(batch.images))
    size = predictor.image_size
    return np.concatenate(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)


def calibration_sample(
    train: Sequence[LabelledImage], count: int, seed: int
) -> list[LabelledImage]:
    """``count`` training images, drawn the same way for the same split and seed."""
    items = sorted(train, key=lambda item: str(item.path))
    return random.Random(seed).sample(items, min(count, len(items)))


def add_variants(
    bundle_dir: Path,
    train: Sequence[LabelledImage],
    test: Sequence[LabelledImage],
    options: Int8Options,
    *,
    calibration_override: np.ndarray | None = None,
) -> GateReport | None:
    """Quantise, judge and record; returns the gate's report (None: INT8 disabled or no ONNX).

    ``calibration_override``: uint8 images to calibrate on instead of the training sample (how a
    test shows the gate refusing a broken calibration).
    """
    bundle = load_bundle(bundle_dir)
    if bundle.onnx_path is None:
        log.info("no ONNX model in the bundle (export_onnx=false): no INT8 variant, no probe")
        return None
    fp32 = Predictor(bundle, backend="onnx")
    probe = decoded_arrays(list(test)[: options.probe_images], fp32)
    if not options.enabled or not test:
        record_variants(bundle_dir, int8_file=None, int8_gate=None, probe_images=probe)
        return None
    if calibration_override is not None:
        calibration = calibration_override
    else:
        sample = calibration_sample(train, options.calibration_images, options.seed)
        calibration = decoded_arrays(sample, fp32)
    int8_path = bundle_dir / INT8_ONNX_FILE
    quantize(bundle.onnx_path, int8_path, fp32.model_input(calibration))
    bundle.int8_onnx_path = int8_path
    int8 = Predictor(bundle, backend="onnx-int8")
    reference, quantised = predict_items_with([fp32, int8], test)
    y_true = np.array([item.label for item in test], dtype=np.int64)
    report = judge(y_true, reference, quantised, options.gate, calibration_images=len(calibration))
    if not report.passed:
        int8_path.unlink()
    record_variants(
        bundle_dir,
        int8_file=INT8_ONNX_FILE if report.passed else None,
        int8_gate=report.to_dict(),
        probe_images=probe,
    )
    log.log(logging.INFO if report.passed else logging.WARNING, "%s", report.summary())
    return report


def int8_options(cfg: Any) -> Int8Options:
    """The run's ``int8`` config group (and ``probe_images``) as options."""
    int8 = cfg.int8
    return Int8Options(
        enabled=bool(int8.enabled),
        calibration_images=int(int8.calibration_images),
        gate=Int8Gate(
            max_accuracy_drop=float(int8.max_accuracy_drop),
            max_recall_drop=float(int8.max_recall_drop),
            min_agreement=float(int8.min_agreement),
        ),
        probe_images=int(cfg.probe_images),
        seed=int(cfg.seed),
    )


def int8_tags(report: dict[str, Any] | None) -> dict[str, str]:
    """Registry tags of the gate's outcome: what ``GET /api/v1/models`` and the console show."""
    if report is None:
        return {TAG_INT8: "none"}
    return {
        TAG_INT8: "passed" if report["passed"] else "failed",
        "int8_accuracy_drop": f"{report['accuracy_drop']:.6f}",
        "int8_agreement": f"{report['agreement']:.6f}",
        "int8_worst_recall_drop": f"{max(report['recall_drops'].values(), default=0.0):.6f}",
        "int8_failures": "; ".join(report["failures"]),
    }
