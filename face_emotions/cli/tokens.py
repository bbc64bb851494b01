"""``face-emotions tokens``: create, list and revoke the API's bearer tokens."""

from __future__ import annotations

from datetime import datetime

import click

from face_emotions.cli.common import UserError
from face_emotions.cli.common import say_store
from face_emotions.ops.redaction import redact_url


@click.group()
def tokens() -> None:
    """API tokens in EMOTIONS_DATABASE_URL: create (shown once), list, revoke.

    Roles: submit (create jobs, read its own) and admin (every job, training, promotion).
    """


def _token_database() -> str:
    """The database URL, at the newest schema.

    Applies migrations when EMOTIONS_MIGRATE_ON_START allows it (the API would apply them at
    its next start anyway); otherwise asks the user to run ``face-emotions db upgrade``.
    """
    from face_emotions.jobs.migrate import current_revision
    from face_emotions.jobs.migrate import head_revision
    from face_emotions.jobs.migrate import upgrade
    from face_emotions.settings import get_settings

    settings = get_settings()
    url = settings.resolved_database_url
    say_store("database", url)
    try:
        behind = current_revision(url) != head_revision(url)
        if behind and settings.migrate_on_start:
            upgrade(url)
            behind = False
    except Exception as exc:
        raise UserError(
            f"cannot use the database at {redact_url(url)}: {type(exc).__name__}"
        ) from exc
    if behind:
        raise UserError(
            f"the database at {redact_url(url)} is not at the newest schema; "
            "run `face-emotions db upgrade` first"
        )
    return url


@tokens.command("create")
@click.option(
    "--role",
    required=True,
    type=click.Choice(["submit", "admin"]),
    help="submit: create jobs and read its own; admin: everything.",
)
@click.option("--name", default="", help="Who or what uses it (shown by `tokens list`).")
def tokens_create(role: str, name: str) -> None:
    """Create a token; it is printed once on stdout (only its hash is stored)."""
    from face_emotions.jobs.database import create_db_engine
    from face_emotions.jobs.database import session_factory
    from face_emotions.jobs.tokens import MAX_NAME_CHARS
    from face_emotions.jobs.tokens import create_token

    if len(name.strip()) > MAX_NAME_CHARS:
        raise UserError(f"--name is longer than {MAX_NAME_CHARS} characters")
    engine = create_db_engine(_token_database())
    try:
        with session_factory(engine)() as session:
            created = create_token(session, role=role, name=name)
            session.commit()
            record = created.record
    finally:
        engine.dispose()
    label = f", name {record.name!r}" if record.name else ""
    click.echo(
        f"created token {record.id} (role {record.role}{label}); it is shown only now: "
        "store it, then send it as 'Authorization: Bearer <token>'",
        err=True,
    )
    click.echo(created.token)


@tokens.command("list")
@click.option("--active", is_flag=True, help="Leave revoked tokens out.")
def tokens_list(active: bool) -> None:
    """List tokens: id, role, name, prefix, created, last used, revoked (never the token)."""
    from face_emotions.jobs.database import create_db_engine
    from face_emotions.jobs.database import session_factory
    from face_emotions.jobs.tokens import list_tokens

    engine = create_db_engine(_token_database())
    try:
        with session_factory(engine)() as session:
            records = list_tokens(session, include_revoked=not active)
    finally:
        engine.dispose()
    if not records:
        click.echo("no API tokens yet: create one with `face-emotions tokens create`", err=True)
        return
    click.echo(
        f"{'ID':<16}  {'ROLE':<6}  {'PREFIX':<10}  {'CREATED':<16}  {'LAST USED':<16}  "
        f"{'REVOKED':<16}  NAME"
    )
    for record in records:
        click.echo(
            f"{record.id:<16}  {record.role:<6}  {record.prefix:<10}  "
            f"{_when(record.created_at):<16}  {_when(record.last_used_at):<16}  "
            f"{_when(record.revoked_at):<16}  {record.name}"
        )


@tokens.command("revoke")
@click.argument("token_id")
def tokens_revoke(token_id: str) -> None:
    """Revoke token TOKEN_ID (from `tokens list`); requests with it get 401 from then on."""
    from face_emotions.jobs.database import create_db_engine
    from face_emotions.jobs.database import session_factory
    from face_emotions.jobs.tokens import get_token
    from face_emotions.jobs.tokens import revoke_token

    engine = create_db_engine(_token_database())
    try:
        with session_factory(engine)() as session:
            existing = get_token(session, token_id.strip())
            already = existing is not None and existing.revoked_at is not None
            record = revoke_token(session, token_id.strip())
            session.commit()
    finally:
        engine.dispose()
    if record is None:
        raise UserError(f"no token with id {token_id!r} (see `face-emotions tokens list`)")
    if already:
        click.echo(f"token {record.id} was already revoked ({_when(record.revoked_at)})", err=True)
        return
    click.echo(f"revoked token {record.id} (role {record.role})", err=True)


def _when(value: datetime | None) -> str:
    """A timestamp for a table cell: minutes are enough to tell uses apart."""
    return value.strftime("%Y-%m-%d %H:%M") if value is not None else "-"
