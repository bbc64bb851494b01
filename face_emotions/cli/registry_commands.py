"""``face-emotions models`` and ``promote``: the registered versions and the serving alias.

Promotion goes through :func:`face_emotions.registry.promotion.promote`, as the API's and the
trainer's do, so running workers are told (a reload broadcast) and not only at their next poll.
"""

from __future__ import annotations

import click

from face_emotions.cli.common import UserError
from face_emotions.cli.common import say_store


@click.command("models")
def list_models() -> None:
    """List registered versions with their test metrics; * marks the serving alias."""
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
        click.echo(
            f"{mark} v{v.version:<4} {v.tags.get('architecture', '?'):<20} "
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
