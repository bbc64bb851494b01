"""What every ``face-emotions`` command shares: the usage-error type and where output goes.

Errors a user can cause (missing path, unknown model, bad option, an API's 4xx) exit with code 2
and one clear line on stderr; results go to stdout (or ``--output``) so they can be piped.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING
from typing import NoReturn

import click

if TYPE_CHECKING:
    from rich.console import Console

    from face_emotions.cli.api_client import ApiClientError


class UserError(click.ClickException):
    exit_code = 2


def client_exit(exc: ApiClientError) -> NoReturn:
    """An API call failed: 2 for what the user can fix (4xx, unreachable URL), 1 otherwise."""
    click.echo(f"error: {exc}", err=True)
    sys.exit(2 if exc.user_error else 1)


def say_store(kind: str, url: str) -> None:
    """Which registry or database a command used (stderr, passwords hidden): a command run with
    other settings than the services would otherwise look at another store without a word."""
    from face_emotions.ops.redaction import redact_url

    click.echo(f"{kind}: {redact_url(url)}", err=True)


def stderr_console() -> Console:
    from rich.console import Console

    return Console(stderr=True)
