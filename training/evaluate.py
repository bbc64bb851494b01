"""Evaluate a model on a test split through the serving Predictor.

Evaluating the exported bundle (not the Lightning module) tests the artefact that is registered,
with the preprocessing it will be served with. ``python -m training.evaluate`` evaluates any
checkpoint, bundle or ``models:/`` URI on the split of a folder, cropped to faces as that model
was trained (``data.faces=detect``: the same crops as training, from the same cache).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from face_emotions.data.labelled_folder import LabelledImage
from face_emotions.modeling.bundle import Bundle
from face_emotions.modeling.bundle import load_model_source
from face_emotions.modeling.evaluation import EvaluationReport
from face_emotions.modeling.evaluation import evaluate_predictions
from face_emotions.serving.folder_evaluation import predict_items


def evaluate_bundle(
    bundle: Bundle, items: Sequence[LabelledImage], *, batch_size: int = 64, device: str = "cpu"
) -> EvaluationReport:
    y_true = np.array([item.label for item in items], dtype=np.int64)
    return evaluate_predictions(
        y_true, predict_items(bundle, items, batch_size=batch_size, device=device)
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.evaluate",
        description="Evaluate a model on the near-duplicate-aware test split of a labelled folder.",
    )
    parser.add_argument("model", help="checkpoint, bundle directory or models:/ URI")
    parser.add_argument("data", help="labelled folder data/<Class>/*.png|jpg")
    parser.add_argument("--split", default="test", choices=["train", "val", "test"])
    parser.add_argument("--output", type=Path, help="write the JSON report here")
    args = parser.parse_args(argv)

    from face_emotions.faces.detection import FaceDetector
    from face_emotions.settings import get_settings
    from training.datamodule import split_folder
    from training.face_crops import FaceCropping

    bundle = load_model_source(args.model)
    crop = bundle.spec.crop
    faces = None
    if crop.faces == "detect":  # the images the model was trained on: its own crops
        settings = get_settings()
        faces = FaceCropping(
            spec=crop,
            cache_dir=settings.var_dir / "face-crops",
            detector_factory=lambda: FaceDetector.from_settings(settings),
        )
    split = split_folder(args.data, faces=faces)
    report = evaluate_bundle(bundle, getattr(split, args.split))
    text = json.dumps(report.to_dict(), indent=2)
    if args.output:
        report.write_json(args.output)
    print(text)
    print("PASS" if report.passed else "FAIL: " + "; ".join(report.failures), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
