"""Test-split metrics and the pass/fail report against the project's quality targets.

Computed from the confusion matrix with numpy so that training, the registry tags and the API
all report the same numbers for the same predictions.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import numpy as np

from face_emotions.labels import EMOTIONS

# The seed's acceptance criteria for a model trained on the user's data.
TARGETS: dict[str, float] = {"accuracy": 0.88, "weighted_f1": 0.87, "per_class_recall": 0.80}


@dataclass
class ClassMetrics:
    precision: float
    recall: float
    f1: float
    support: int


@dataclass
class EvaluationReport:
    num_images: int
    accuracy: float
    weighted_f1: float
    macro_f1: float
    per_class: dict[str, ClassMetrics]
    confusion_matrix: list[list[int]]
    targets: dict[str, float] = field(default_factory=lambda: dict(TARGETS))
    failures: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def metrics(self) -> dict[str, float]:
        """Flat scalar metrics, the form MLflow and registry tags take."""
        flat = {
            "accuracy": self.accuracy,
            "weighted_f1": self.weighted_f1,
            "macro_f1": self.macro_f1,
        }
        for name, m in self.per_class.items():
            flat[f"precision_{name}"] = m.precision
            flat[f"recall_{name}"] = m.recall
        return flat

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["passed"] = self.passed
        # What the README (and the seed's report) promise a reader: PASS or FAIL, in words.
        data["verdict"] = "PASS" if self.passed else "FAIL"
        data["classes"] = list(EMOTIONS)
        return data

    def write_json(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2))
        return path


def confusion_matrix(
    y_true: np.ndarray, y_pred: np.ndarray, num_classes: int = len(EMOTIONS)
) -> np.ndarray:
    """Rows are true classes, columns predicted classes."""
    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    flat = y_true * num_classes + y_pred
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def evaluate_predictions(
    y_true: np.ndarray, y_pred: np.ndarray, targets: dict[str, float] | None = None
) -> EvaluationReport:
    targets = dict(targets or TARGETS)
    cm = confusion_matrix(y_true, y_pred)
    total = int(cm.sum())
    if total == 0:
        raise ValueError("cannot evaluate on an empty test split")
    tp = np.diag(cm).astype(float)
    support = cm.sum(axis=1).astype(float)
    predicted = cm.sum(axis=0).astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(support > 0, tp / support, 0.0)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / (precision + recall), 0.0)
    # Like sklearn: classes that occur in the truth or the predictions count for macro F1.
    present = (support > 0) | (predicted > 0)
    per_class = {
        name: ClassMetrics(float(precision[i]), float(recall[i]), float(f1[i]), int(support[i]))
        for i, name in enumerate(EMOTIONS)
    }
    report = EvaluationReport(
        num_images=total,
        accuracy=float(tp.sum() / total),
        weighted_f1=float((f1 * support).sum() / support.sum()),
        macro_f1=float(f1[present].mean()),
        per_class=per_class,
        confusion_matrix=cm.tolist(),
        targets=targets,
    )
    if report.accuracy <= targets["accuracy"]:
        report.failures.append(f"accuracy {report.accuracy:.4f} <= {targets['accuracy']}")
    if report.weighted_f1 <= targets["weighted_f1"]:
        report.failures.append(f"weighted F1 {report.weighted_f1:.4f} <= {targets['weighted_f1']}")
    for name, m in per_class.items():
        if m.support and m.recall <= targets["per_class_recall"]:
            report.failures.append(
                f"recall of {name} {m.recall:.4f} <= {targets['per_class_recall']}"
            )
    return report


def plot_confusion_matrix(cm: list[list[int]] | np.ndarray, path: str | Path) -> Path:
    """Counts plus row-normalised colour, so small classes are as readable as big ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    with np.errstate(divide="ignore", invalid="ignore"):
        normalised = np.nan_to_num(cm / cm.sum(axis=1, keepdims=True))
    fig, ax = plt.subplots(figsize=(6, 5), dpi=110)
    image = ax.imshow(normalised, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(EMOTIONS)), EMOTIONS, rotation=30, ha="right")
    ax.set_yticks(range(len(EMOTIONS)), EMOTIONS)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (test split)")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            colour = "white" if normalised[i, j] > 0.5 else "black"
            ax.text(j, i, str(cm[i, j]), ha="center", va="center", color=colour, fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.046, label="row share")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
