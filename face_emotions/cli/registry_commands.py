"""``face-emotions models`` and ``promote``: the registered versions and the serving alias.

``models import`` registers an ONNX model trained elsewhere (checked, optionally evaluated, then
promoted by the usual rules); ``models export`` writes any version as ONNX plus its spec.
Promotion goes through :func:`face_emotions.registry.promotion.promote`, as the API's and the
trainer's do, so running workers are told (a reload broadcast) and not only at their next poll.
"""

from __future__ import annotations

from pathlib import Path

import click

from face_emotions.cli.common import UserError
from face_emotions.cli.common import say_store


@click.group("models", invoke_without_command=True)
@click.pass_context
def list_models(ctx: click.Context) -> None:
    """List registered versions with their test metrics; * marks the serving alias.

    Subcommands: import (an ONNX model made elsewhere), export (a version as ONNX + spec).
    """
    if ctx.invoked_subcommand is not None:
        return
    from face_emotions.registry.mlflow_registry import Registry

    registry = Registry()
    say_store("registry", registry.tracking_uri)
    versions = registry.list_versions()
    if not versions:
        click.echo(
            f"no versions of {registry.model_name!r} registered in this registry yet "
            "(EMOTIONS_VAR_DIR or EMOTIONS_MLFLOW_TRACKING_URI choose another one)",
            err=True,
        )
        return
    for v in versions:
        mark = "*" if registry.settings.model_alias in v.aliases else " "
        source = " (imported)" if v.tags.get("source") == "imported" else ""
        click.echo(
            f"{mark} v{v.version:<4} {v.tags.get('architecture', '?') + source:<20} "
            f"acc={v.tags.get('accuracy', '?'):<10} wF1={v.tags.get('weighted_f1', '?'):<10} "
            f"aliases={','.join(v.aliases) or '-'}"
        )


@click.command()
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
    from face_emotions.jobs.broker import BrokerClient
    from face_emotions.registry.mlflow_registry import Registry
    from face_emotions.registry.mlflow_registry import RegistryError
    from face_emotions.registry.promotion import promote as promote_version

    registry = Registry()
    say_store("registry", registry.tracking_uri)
    try:
        candidate = registry.get_version(version)
    except RegistryError as exc:
        raise UserError(str(exc)) from exc
    broker = BrokerClient.from_settings(registry.settings)
    decision = promote_version(registry, candidate, mode, announce=broker.announce_promotion)
    click.echo(("promoted: " if decision.promote else "not promoted: ") + decision.summary())


@list_models.command("import")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--spec",
    "spec_path",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML: input_size, colour, layout, scale/mean/std, output, labels, face_crop, source.",
)
@click.option(
    "--eval-folder",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Labelled folder (<Class>/*.png) to evaluate it on; auto promotion needs one.",
)
@click.option(
    "--promote",
    "promote_mode",
    default="auto",
    show_default=True,
    type=click.Choice(["auto", "never", "force"]),
    help="auto: only if it beats the champion on --eval-folder; force: always.",
)
def import_model(model: Path, spec_path: Path, eval_folder: Path | None, promote_mode: str) -> None:
    """Register an ONNX expression model MODEL, described by --spec, as a new version."""
    from face_emotions.jobs.broker import BrokerClient
    from face_emotions.modeling.import_spec import ImportRefused
    from face_emotions.modeling.import_spec import load_spec_text
    from face_emotions.modeling.import_spec import map_labels
    from face_emotions.registry.mlflow_registry import Registry
    from face_emotions.serving.model_import import import_model as run_import

    try:
        spec = load_spec_text(spec_path.read_bytes())
        mapping = map_labels(spec.labels)
    except ImportRefused as exc:
        raise UserError(str(exc)) from exc
    click.echo("label mapping:")
    for line in mapping.describe():
        click.echo(f"  {line}")
    registry = Registry()
    say_store("registry", registry.tracking_uri)
    broker = BrokerClient.from_settings(registry.settings)
    try:
        outcome = run_import(
            registry,
            model,
            spec,
            eval_folder=eval_folder,
            promote_mode=promote_mode,
            announce=broker.announce_promotion,
        )
    except ImportRefused as exc:
        raise UserError(str(exc)) from exc
    click.echo(f"registered version {outcome.version.version} (source=imported)")
    if outcome.report is not None:
        report = outcome.report
        click.echo(
            f"evaluation on {report.num_images} images: accuracy {report.accuracy:.4f}, "
            f"weighted F1 {report.weighted_f1:.4f}, "
            + ", ".join(f"recall {k} {m.recall:.3f}" for k, m in report.per_class.items())
        )
        click.echo("confusion matrix (rows true, columns predicted):")
        for row in report.confusion_matrix:
            click.echo("  " + " ".join(f"{n:5d}" for n in row))
    decision = outcome.decision
    click.echo(("promoted: " if decision.promote else "not promoted: ") + decision.summary())


@list_models.command("export")
@click.argument("version")
@click.option(
    "-o",
    "--output",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write model.onnx and spec.yaml into.",
)
def export_model(version: str, output: Path) -> None:
    """Write VERSION (a number or an alias such as champion) as model.onnx + spec.yaml."""
    from face_emotions.modeling.bundle import BundleError
    from face_emotions.registry.mlflow_registry import Registry
    from face_emotions.registry.mlflow_registry import RegistryError
    from face_emotions.serving.model_export import export_version

    registry = Registry()
    say_store("registry", registry.tracking_uri)
    reference = version if version.isdigit() else f"@{version.lstrip('@')}"
    try:
        exported = export_version(registry, reference, output)
    except (RegistryError, BundleError) as exc:
        raise UserError(str(exc)) from exc
    click.echo(f"v{exported.version}: {exported.onnx_path} and {exported.spec_path}")
