"""``face-emotions infer``: classify local images with any model, no services needed.

Prints the seed's JSON (stdout or ``--output``), its configuration block and summary table
(stderr). Exit code 0 if any image was classified, 1 if none could be, 2 on a usage error.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from face_emotions.cli.common import UserError
from face_emotions.cli.common import stderr_console


@click.command()
@click.option(
    "--model",
    "model_source",
    default="models:/face-emotion@champion",
    show_default=True,
    help="Checkpoint (.ckpt), bundle directory, or MLflow URI models:/NAME@ALIAS|/VERSION.",
)
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-size", default=32, show_default=True, type=click.IntRange(1, 4096))
@click.option(
    "--device", default="auto", show_default=True, type=click.Choice(["auto", "cpu", "cuda"])
)
@click.option("--backend", default="torch", show_default=True, type=click.Choice(["torch", "onnx"]))
@click.option("--recursive/--no-recursive", default=True, show_default=True)
@click.option(
    "--faces",
    type=click.Choice(["all", "largest", "none"]),
    default=None,
    help="Classify every face (all), the largest, or the whole image without detection (none). "
    "Default: EMOTIONS_FACES (all).",
)
@click.option("--quiet", is_flag=True, help="No configuration block, progress or summary.")
def infer(
    model_source: str,
    paths: tuple[Path, ...],
    output: Path | None,
    batch_size: int,
    device: str,
    backend: str,
    recursive: bool,
    faces: str | None,
    quiet: bool,
) -> None:
    """Classify images or folders PATHS locally and print the seed's JSON.

    Exit code 0 if any image was classified, 1 if none could be, 2 on a usage error.
    """
    from rich.progress import Progress

    from face_emotions.data.images import iter_image_files
    from face_emotions.faces.detection import DetectorUnavailable
    from face_emotions.faces.detection import FaceDetector
    from face_emotions.modeling.bundle import BundleError
    from face_emotions.modeling.bundle import load_model_source
    from face_emotions.registry.mlflow_registry import RegistryError
    from face_emotions.serving.decode_ahead import iter_decoded_batches
    from face_emotions.serving.face_regions import classify_regions
    from face_emotions.serving.predictor import Predictor
    from face_emotions.serving.predictor import resolve_device
    from face_emotions.serving.seed_format import configuration_block
    from face_emotions.serving.seed_format import image_record
    from face_emotions.serving.seed_format import inference_document
    from face_emotions.serving.seed_format import summary_table
    from face_emotions.settings import get_settings

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += iter_image_files(path, recursive=recursive)
        elif path.exists():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    if not files:
        raise UserError(f"no image files found in {', '.join(map(str, paths))}")
    settings = get_settings()
    policy = faces or settings.faces
    try:
        torch_device = resolve_device(device)
        bundle = load_model_source(model_source)
        predictor = Predictor(bundle, device=torch_device, backend=backend)  # type: ignore[arg-type]
        detector = (
            None if policy == "none" else FaceDetector.from_settings(settings, torch_device.type)
        )
    except (BundleError, RegistryError, DetectorUnavailable, RuntimeError) as exc:
        raise UserError(str(exc)) from exc

    images_path = ", ".join(str(p) for p in paths)
    if not quiet:
        from face_emotions.ops.redaction import redact_url

        registry = redact_url(settings.tracking_uri)
        click.echo(
            configuration_block(
                {
                    "Checkpoint": model_source,
                    **({"Registry": registry} if model_source.startswith("models:/") else {}),
                    "Images": f"{images_path} ({len(files)} files)",
                    "Output": output or "stdout",
                    "Accelerator": torch_device.type,
                    "Backend": backend,
                    "Batch size": batch_size,
                    "Faces": f"{policy} (crop margin {predictor.spec.crop.margin})"
                    if policy != "none"
                    else "none (whole images)",
                }
            ),
            err=True,
        )
    predictions: list[dict] = []
    errors: list[dict[str, str]] = []
    with Progress(disable=quiet, transient=True, console=stderr_console()) as progress:
        task = progress.add_task("classifying", total=len(files))
        detect_many = detector.detect_many if detector is not None else None
        for batch in iter_decoded_batches(files, batch_size, detect_many=detect_many):
            if batch.images:
                classified = classify_regions(
                    batch.images,
                    batch.faces,
                    policy=policy,
                    spec=predictor.spec.crop,
                    predict=predictor.predict_images,
                )
                predictions += [
                    image_record(str(p), c) for p, c in zip(batch.paths, classified, strict=True)
                ]
            errors += [{"image_path": str(p), "error": reason} for p, reason in batch.errors]
            progress.advance(task, len(batch.paths) + len(batch.errors))

    document = inference_document(model_source, images_path, predictions, errors)
    text = json.dumps(document, indent=4)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text + "\n")
    else:
        click.echo(text)
    if not quiet:
        click.echo(summary_table(predictions, errors), err=True)
    if not predictions:
        click.echo(f"error: none of {len(files)} images could be read", err=True)
        sys.exit(1)
