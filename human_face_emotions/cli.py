"""``face-emotions`` console script: sample data, local inference, registry commands.

Errors a user can cause (missing path, unknown model, bad option) exit with code 2 and one clear
line on stderr; results go to stdout (or ``--output``) so they can be piped.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from human_face_emotions import __version__


class UserError(click.ClickException):
    exit_code = 2


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="face-emotions")
@click.option("-v", "--verbose", is_flag=True, help="Log at INFO level.")
def main(verbose: bool) -> None:
    """Classify facial emotions (Angry, Fear, Happy, Sad, Surprised) at batch scale."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


@main.command("sample-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sample_data(out: Path, per_class: int, seed: int, quiet: bool) -> None:
    """Write procedural faces as OUT/<Class>/<n>.png|jpg for demos and tests."""
    from human_face_emotions.sample_data import write_sample_dataset

    counts = write_sample_dataset(out, per_class, seed, progress=not quiet)
    click.echo(f"wrote {sum(counts.values())} images to {out}: " + json.dumps(counts), err=True)


@main.command()
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
@click.option("--quiet", is_flag=True, help="No configuration block, progress or summary.")
def infer(
    model_source: str,
    paths: tuple[Path, ...],
    output: Path | None,
    batch_size: int,
    device: str,
    backend: str,
    recursive: bool,
    quiet: bool,
) -> None:
    """Classify images or folders PATHS locally and print the seed's JSON.

    Exit code 0 if any image was classified, 1 if none could be, 2 on a usage error.
    """
    from rich.progress import Progress

    from human_face_emotions.batching import iter_decoded_batches
    from human_face_emotions.bundle import BundleError, load_model_source
    from human_face_emotions.images import iter_image_files
    from human_face_emotions.inference_output import (
        configuration_block,
        inference_document,
        prediction_record,
        summary_table,
    )
    from human_face_emotions.predictor import Predictor, resolve_device
    from human_face_emotions.registry import RegistryError

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
    try:
        torch_device = resolve_device(device)
        bundle = load_model_source(model_source)
        predictor = Predictor(bundle, device=torch_device, backend=backend)  # type: ignore[arg-type]
    except (BundleError, RegistryError, RuntimeError) as exc:
        raise UserError(str(exc)) from exc

    images_path = ", ".join(str(p) for p in paths)
    if not quiet:
        click.echo(
            configuration_block(
                {
                    "Checkpoint": model_source,
                    "Images": f"{images_path} ({len(files)} files)",
                    "Output": output or "stdout",
                    "Accelerator": torch_device.type,
                    "Backend": backend,
                    "Batch size": batch_size,
                }
            ),
            err=True,
        )
    predictions: list[dict] = []
    errors: list[dict[str, str]] = []
    with Progress(disable=quiet, transient=True, console=_stderr_console()) as progress:
        task = progress.add_task("classifying", total=len(files))
        for batch in iter_decoded_batches(files, batch_size):
            if batch.images:
                probabilities = predictor.predict_images(batch.images)
                predictions += [
                    prediction_record(str(p), row)
                    for p, row in zip(batch.paths, probabilities, strict=True)
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


@main.command("models")
def list_models() -> None:
    """List registered versions with their test metrics; * marks the serving alias."""
    from human_face_emotions.registry import Registry

    registry = Registry()
    versions = registry.list_versions()
    if not versions:
        click.echo(f"no versions of {registry.model_name!r} registered yet", err=True)
        return
    for v in versions:
        mark = "*" if registry.settings.model_alias in v.aliases else " "
        click.echo(
            f"{mark} v{v.version:<4} {v.tags.get('architecture', '?'):<20} "
            f"acc={v.tags.get('accuracy', '?'):<10} wF1={v.tags.get('weighted_f1', '?'):<10} "
            f"aliases={','.join(v.aliases) or '-'}"
        )


@main.command()
@click.argument("version", type=click.IntRange(min=1))
@click.option(
    "--mode",
    default="force",
    show_default=True,
    type=click.Choice(["auto", "force"]),
    help="force moves the alias; auto only if the version beats the champion on its test split.",
)
def promote(version: int, mode: str) -> None:
    """Point the serving alias (champion) at VERSION; running workers pick it up."""
    from human_face_emotions.registry import Registry, RegistryError

    registry = Registry()
    try:
        candidate = registry.get_version(version)
    except RegistryError as exc:
        raise UserError(str(exc)) from exc
    decision = registry.promote(candidate, mode)
    click.echo(("promoted: " if decision.promote else "not promoted: ") + decision.reason)


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


if __name__ == "__main__":
    main()
