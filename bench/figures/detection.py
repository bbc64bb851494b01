"""``detection``: the pipeline with face detection on 640x480 photos vs the same pipeline without.

Both are one REST folder job over the same photos on the main worker, interleaved: with the
deployment's default face policy (``all``: detect, crop every face, classify the crops) and
with ``none`` (the whole image). The detector's share of the work is measured beside it in
this process, over the same photos with the worker's decode threads: thread-seconds of
decoding, of detection and of classifying the regions.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from bench import assets
from bench.context import Context
from bench.figures import Figure
from bench.figures import verdict_text
from bench.stats import interleave
from bench.stats import paired_ratios
from bench.stats import speedup

if TYPE_CHECKING:
    from pathlib import Path

    from bench.services import Cluster


def detection_figure(
    context: Context, cluster: Cluster, bundle_dir: Path, photos: list[Path]
) -> None:
    cluster.consume(["main"])
    cluster.run_job(assets.PHOTOS, faces="all")  # warm: the worker loads the detector once
    variants = {
        "with_detection": lambda: cluster.run_job(assets.PHOTOS, faces="all").seconds,
        "without_detection": lambda: cluster.run_job(assets.PHOTOS, faces="none").seconds,
    }
    samples = interleave(variants, len(photos), context.plan.rounds)
    with_detection, without = samples["with_detection"], samples["without_detection"]
    ratio = speedup(with_detection, without)
    shares = detector_shares(context, bundle_dir, photos)
    line = (
        f"pipeline with detection: {ratio:.2f} of the pipeline without "
        f"({with_detection.rate:.1f} vs {without.rate:.1f} photos/s, detector "
        f"{shares['detector_share']:.0%} of the work) ({verdict_text('detection', ratio)})"
    )
    context.analysis.append(
        f"detection on {len(photos)} photos of {assets.PHOTO_SIZE[0]}x{assets.PHOTO_SIZE[1]}: "
        f"{shares['faces']} faces found; per photo {shares['decode_ms']:.1f} ms decoding, "
        f"{shares['detect_ms']:.1f} ms detecting, {shares['classify_ms']:.1f} ms classifying "
        f"(in-process); detection of a micro-batch overlaps the forward pass of the one before"
    )
    context.record(
        Figure(
            "detection",
            round(ratio, 2),
            f"{ratio:.2f} ({with_detection.rate:.1f} / {without.rate:.1f} photos/s)",
            line,
            details={
                "with_detection": with_detection.as_dict(),
                "without_detection": without.as_dict(),
                "paired_ratios": paired_ratios(with_detection, without),
                "in_process": shares,
                "notes": [
                    f"one REST folder job of {len(photos)} JPEG photos "
                    f"({assets.PHOTO_SIZE[0]}x{assets.PHOTO_SIZE[1]}, scikit-image's real "
                    "photos placed at random on blurred backgrounds: a third with a face) with "
                    "faces=all vs faces=none, interleaved, on the main worker",
                    "detection: MTCNN on a copy at most EMOTIONS_FACE_DETECT_MAX_SIDE (320) "
                    "long, one batched call per micro-batch on a thread of its own, ahead of "
                    "the forward pass",
                ],
            },
        )
    )


def detector_shares(context: Context, bundle_dir: Path, photos: list[Path]) -> dict:
    """Seconds of decoding (summed over the decode threads), of batched detection and of
    classifying the regions, over the photos in this process, as the worker runs them."""
    from face_emotions.faces.detection import FaceDetector
    from face_emotions.modeling.bundle import load_bundle
    from face_emotions.serving.decode_ahead import iter_decoded_batches
    from face_emotions.serving.face_regions import classify_regions
    from face_emotions.serving.predictor import Predictor
    from face_emotions.settings import Settings

    settings = Settings(device=context.args.device)
    predictor = Predictor(load_bundle(bundle_dir), device=context.args.device)
    detector = FaceDetector.from_settings(settings, context.args.device)
    detector.detect(assets_warm_image())
    decode = detect = classify = 0.0
    faces = 0
    batches = iter_decoded_batches(
        photos,
        context.batch_size,
        workers=settings.decode_threads,
        detect_many=detector.detect_many,
    )
    for batch in batches:
        decode += batch.decode_seconds
        detect += batch.detect_seconds
        started = time.perf_counter()
        classified = classify_regions(
            batch.images,
            batch.faces,
            policy="all",
            spec=predictor.spec.crop,
            predict=predictor.predict_images,
        )
        classify += time.perf_counter() - started
        faces += sum(c.faces_found or 0 for c in classified)
    total = decode + detect + classify
    count = max(len(photos), 1)
    return {
        "photos": len(photos),
        "faces": faces,
        "decode_ms": 1000 * decode / count,
        "detect_ms": 1000 * detect / count,
        "classify_ms": 1000 * classify / count,
        "detector_share": detect / total if total else 0.0,
    }


def assets_warm_image():
    """A photo-sized grey image: the detector's first call builds its pyramid kernels."""
    from PIL import Image

    return Image.new("RGB", assets.PHOTO_SIZE, (128, 128, 128))
