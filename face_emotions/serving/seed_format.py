"""The seed's output contract: per-image JSON records and the human summary table.

Users script against this shape (``image_path, predicted_class, predicted_emotion, confidence,
all_probabilities``), so the local CLI, the REST API and the worker all build records here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from face_emotions.labels import EMOTIONS
from face_emotions.serving.face_regions import ClassifiedImage

RULE = "=" * 60
THIN_RULE = "-" * 60


def prediction_record(image_path: str, probabilities: Sequence[float] | np.ndarray) -> dict:
    probs = [float(p) for p in probabilities]
    index = int(np.argmax(probs))
    return {
        "image_path": image_path,
        "predicted_class": index,
        "predicted_emotion": EMOTIONS[index],
        "confidence": round(probs[index], 4),
        "all_probabilities": {name: round(p, 4) for name, p in zip(EMOTIONS, probs, strict=True)},
    }


def rounded_face(face: Mapping[str, Any]) -> dict[str, Any]:
    """One face's record as users see it: probabilities rounded like the image-level ones."""
    probabilities = face.get("all_probabilities") or {}
    return {
        **face,
        "confidence": None if face.get("confidence") is None else round(face["confidence"], 4),
        "all_probabilities": {name: round(float(p), 4) for name, p in probabilities.items()},
    }


def image_record(image_path: str, classified: ClassifiedImage) -> dict[str, Any]:
    """The seed's record (its image-level fields describe the largest face) plus every face.

    ``faces_found`` 0 says the detector found no face and the whole image was classified;
    None says detection did not run (face policy ``none``). The same shape as the API's.
    """
    record = prediction_record(image_path, classified.probabilities)
    record["faces_found"] = classified.faces_found
    record["image_size"] = list(classified.size)
    record["faces"] = [rounded_face(face) for face in classified.faces]
    return record


def inference_document(
    model: str,
    images_path: str,
    predictions: list[dict],
    errors: Sequence[Mapping[str, str]] = (),
) -> dict[str, Any]:
    document: dict[str, Any] = {
        "model_checkpoint": model,
        "images_path": images_path,
        "num_images": len(predictions),
        "predictions": predictions,
    }
    if errors:
        document["num_errors"] = len(errors)
        document["errors"] = list(errors)
    return document


def configuration_block(items: Mapping[str, Any]) -> str:
    lines = [RULE, "Inference Configuration:", RULE]
    lines += [f"{key}: {value}" for key, value in items.items()]
    lines.append(RULE)
    return "\n".join(lines)


def summary_table(
    predictions: Iterable[Mapping[str, Any]],
    errors: Sequence[Mapping[str, str]] = (),
    *,
    max_rows: int = 50,
) -> str:
    """Counts per emotion, then one line per image (capped: a 50k-image job stays readable)."""
    predictions = list(predictions)
    counts = Counter(p["predicted_emotion"] for p in predictions)
    lines = [RULE, "Summary:", RULE]
    lines += [f"  {name}: {counts[name]}" for name in EMOTIONS if counts[name]]
    searched = [p for p in predictions if p.get("faces_found") is not None]
    if searched:
        faces = sum(p["faces_found"] for p in searched)
        without = sum(1 for p in searched if p["faces_found"] == 0)
        lines.append(f"  faces: {faces} in {len(searched) - without} images")
        lines.append(f"  images without a face (classified whole): {without}")
    if errors:
        lines.append(f"  unreadable: {len(errors)}")
    lines.append(THIN_RULE)
    for p in predictions[:max_rows]:
        name = Path(p["image_path"]).name
        found = p.get("faces_found")
        note = (
            ""
            if found is None or found == 1
            else (" [no face]" if found == 0 else f" [{found} faces]")
        )
        lines.append(f"  {name}: {p['predicted_emotion']} ({p['confidence'] * 100:.2f}%){note}")
    if len(predictions) > max_rows:
        lines.append(f"  ... and {len(predictions) - max_rows} more")
    for e in errors[:max_rows]:
        lines.append(f"  {Path(e['image_path']).name}: ERROR {e['error']}")
    if len(errors) > max_rows:
        lines.append(f"  ... and {len(errors) - max_rows} more errors")
    lines.append(RULE)
    return "\n".join(lines)
