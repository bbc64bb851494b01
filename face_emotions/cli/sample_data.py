"""``face-emotions sample-data``: procedural faces to try the pipeline without a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import click


@click.command("sample-data")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--per-class", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sample_data(out: Path, per_class: int, seed: int, quiet: bool) -> None:
    """Write procedural faces as OUT/<Class>/<n>.png|jpg for demos and tests."""
    from face_emotions.data.sample_faces import write_sample_dataset

    counts = write_sample_dataset(out, per_class, seed, progress=not quiet)
    click.echo(f"wrote {sum(counts.values())} images to {out}: " + json.dumps(counts), err=True)
