"""``face-emotions`` console script: one command group per module of this package.

``sample-data`` and ``infer`` work on local files; ``models``/``promote`` on the registry;
``db`` and ``tokens`` on the jobs database; ``submit``, ``status``, ``results``, ``jobs`` and
``cancel`` talk to the REST API.
"""

from __future__ import annotations

import logging
import sys

import click

from face_emotions import __version__
from face_emotions.cli.database import db
from face_emotions.cli.infer import infer
from face_emotions.cli.jobs import cancel
from face_emotions.cli.jobs import list_jobs
from face_emotions.cli.jobs import results
from face_emotions.cli.jobs import status
from face_emotions.cli.jobs import submit
from face_emotions.cli.registry_commands import list_models
from face_emotions.cli.registry_commands import promote
from face_emotions.cli.sample_data import sample_data
from face_emotions.cli.tokens import tokens


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


for command in (
    sample_data,
    infer,
    list_models,
    promote,
    db,
    tokens,
    submit,
    status,
    results,
    list_jobs,
    cancel,
):
    main.add_command(command)


if __name__ == "__main__":
    main()
