"""``face-emotions db``: the jobs database's schema (Alembic migrations)."""

from __future__ import annotations

import click

from face_emotions.cli.common import say_store
from face_emotions.ops.redaction import redact_url


@click.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations to EMOTIONS_DATABASE_URL (default: the SQLite file under var/)."""
    from face_emotions.jobs.migrate import current_revision
    from face_emotions.jobs.migrate import upgrade
    from face_emotions.settings import get_settings

    url = get_settings().resolved_database_url
    upgrade(url, revision)
    click.echo(f"database at {redact_url(url)} is at revision {current_revision(url)}", err=True)


@db.command("current")
def db_current() -> None:
    """Print the applied and the newest revision."""
    from face_emotions.jobs.migrate import current_revision
    from face_emotions.jobs.migrate import head_revision
    from face_emotions.settings import get_settings

    url = get_settings().resolved_database_url
    say_store("database", url)
    click.echo(f"current: {current_revision(url)}  head: {head_revision(url)}")
