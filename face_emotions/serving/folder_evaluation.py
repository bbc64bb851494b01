"""A version's report on a labelled folder, as training reports on its test split.

An imported model has no test split of ours; the folder a user names is its test set, and the
champion is measured on the same folder so ``promote=auto`` compares like with like. Images
are classified whole (a folder of face crops), through the same :class:`Predictor` workers use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from face_emotions.data.labelled_folder import LabelledImage
from face_emotions.data.labelled_folder import scan_labelled_folder
from face_emotions.modeling.bundle import Bundle
from face_emotions.modeling.evaluation import EvaluationReport
from face_emotions.modeling.evaluation import evaluate_predictions
from face_emotions.serving.decode_ahead import iter_decoded_batches
from face_emotions.serving.predictor import Backend
from face_emotions.serving.predictor import Predictor


def predict_items(
    bundle: Bundle,
    items: Sequence[LabelledImage],
    *,
    batch_size: int = 64,
    device: str = "cpu",
    backend: Backend = "torch",
) -> np.ndarray:
    """Predicted class per item; an unreadable image counts as wrong (-1), never as skipped."""
    predictor = Predictor(bundle, device=device, backend=backend)
    return predict_items_with([predictor], items, batch_size=batch_size)[0]


def predict_items_with(
    predictors: Sequence[Predictor], items: Sequence[LabelledImage], *, batch_size: int = 64
) -> list[np.ndarray]:
    """Each predictor's class per item, from one decode of the images (for side-by-side
    comparisons such as the INT8 gate); an unreadable image is -1 for every predictor."""
    predicted = [np.full(len(items), -1, dtype=np.int64) for _ in predictors]
    index = {str(item.path): i for i, item in enumerate(items)}
    for batch in iter_decoded_batches([item.path for item in items], batch_size):
        if not batch.images:
            continue
        rows = [index[str(path)] for path in batch.paths]
        arrays: dict[int, np.ndarray] = {}
        for predictor, out in zip(predictors, predicted, strict=True):
            size = predictor.image_size
            if size not in arrays:
                arrays[size] = predictor.batch_array(batch.images)
            out[rows] = predictor.predict_array(arrays[size]).argmax(axis=1)
    return predicted


def evaluate_on_items(
    bundle: Bundle, items: Sequence[LabelledImage], *, batch_size: int = 64, device: str = "cpu"
) -> EvaluationReport:
    """Accuracy, F1, per-class recall, confusion matrix; an unreadable image counts as wrong."""
    backend: Backend = "onnx" if bundle.onnx_path else "torch"
    predicted = predict_items(bundle, items, batch_size=batch_size, device=device, backend=backend)
    y_true = np.array([item.label for item in items], dtype=np.int64)
    return evaluate_predictions(y_true, predicted)


def evaluate_on_folder(bundle: Bundle, folder: Path, *, device: str = "cpu") -> EvaluationReport:
    """Every image of ``folder/<Class>/`` (raises ``DatasetError`` for an unusable folder)."""
    return evaluate_on_items(bundle, scan_labelled_folder(folder).items, device=device)
