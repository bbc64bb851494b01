"""``face-emotions submit|status|results``: batch jobs through the REST API.

The CLI speaks only the documented HTTP contract (:mod:`face_emotions.cli.api_client`), so it
works against any deployment: ``--url`` / ``EMOTIONS_API_URL`` and ``--token`` /
``EMOTIONS_API_TOKEN``.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from face_emotions.cli.common import UserError
from face_emotions.cli.common import client_exit
from face_emotions.cli.common import stderr_console

API_OPTIONS = [
    click.option("--url", envvar="EMOTIONS_API_URL", help="API base URL (default 127.0.0.1:8000)."),
    click.option("--token", envvar="EMOTIONS_API_TOKEN", help="API token (Bearer)."),
]


def api_options(command):
    for option in reversed(API_OPTIONS):
        command = option(command)
    return command


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@api_options
@click.option(
    "--folder",
    "as_folder",
    is_flag=True,
    help="PATH is a folder on the server's shared storage, relative to its EMOTIONS_DATA_ROOT; "
    "nothing is uploaded.",
)
@click.option("--batch-size", type=click.IntRange(1, 1024))
@click.option("--model-version", type=click.IntRange(min=1), help="Pin a model version.")
@click.option("--idempotency-key", help="Resubmitting with the same key returns the same job.")
@click.option(
    "--faces",
    type=click.Choice(["all", "largest", "none"]),
    help="Classify every face (all), the largest, or whole images (none). Default: the "
    "server's EMOTIONS_FACES (all).",
)
@click.option("--wait/--no-wait", default=False, help="Follow the job and print its results.")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", default="json", type=click.Choice(["json", "jsonl", "csv"]))
def submit(
    paths: tuple[Path, ...],
    url: str | None,
    token: str | None,
    as_folder: bool,
    batch_size: int | None,
    model_version: int | None,
    idempotency_key: str | None,
    faces: str | None,
    wait: bool,
    output: Path | None,
    fmt: str,
) -> None:
    """Submit images, folders (uploaded) or a .zip as one batch job."""
    from face_emotions.cli.api_client import ApiClientError
    from face_emotions.cli.api_client import EmotionsClient

    client = EmotionsClient(url, token)
    try:
        if as_folder:
            if len(paths) != 1:
                raise UserError("--folder takes exactly one folder path")
            job = client.submit_folder(
                str(paths[0]),
                batch_size=batch_size,
                model_version=model_version,
                idempotency_key=idempotency_key,
                faces=faces,
            )
        else:
            job = client.submit_files(
                _upload_files(paths),
                batch_size=batch_size,
                model_version=model_version,
                idempotency_key=idempotency_key,
                faces=faces,
            )
        click.echo(f"job {job['id']}: {job['status']}, {job['total']} images", err=True)
        if job.get("warning"):
            click.echo(f"warning: {job['warning']}", err=True)
        if job.get("skipped"):
            names = ", ".join(job.get("skipped_files") or [])
            more = "" if job["skipped"] <= len(job.get("skipped_files") or []) else ", ..."
            click.echo(
                f"skipped {job['skipped']} zip entries (not images): {names}{more}", err=True
            )
        if not wait:
            click.echo(job["id"])
            return
        finished = follow_with_progress(client, job["id"])
        emit_results(client, finished, fmt, output, source=", ".join(map(str, paths)))
    except ApiClientError as exc:
        client_exit(exc)


@click.command()
@click.argument("job_id")
@api_options
@click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it ends.")
def status(job_id: str, url: str | None, token: str | None, wait: bool) -> None:
    """Show a job's status, counts and model versions (JOB_ID: the full id or 8+ characters)."""
    from face_emotions.cli.api_client import ApiClientError
    from face_emotions.cli.api_client import EmotionsClient

    client = EmotionsClient(url, token)
    try:
        job_id = client.resolve(job_id)  # once: a short id, then the full one when polling
        job = follow_with_progress(client, job_id) if wait else client.job(job_id)
    except ApiClientError as exc:
        client_exit(exc)
    click.echo(json.dumps(job, indent=2))


@click.command()
@click.argument("job_id")
@api_options
@click.option("--format", "fmt", default="json", type=click.Choice(["json", "jsonl", "csv"]))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path))
def results(job_id: str, url: str | None, token: str | None, fmt: str, output: Path | None) -> None:
    """Print or save a job's results (json: the seed's document; jsonl/csv: exports).

    JOB_ID is the full id or a unique prefix of at least 8 characters."""
    from face_emotions.cli.api_client import ApiClientError
    from face_emotions.cli.api_client import EmotionsClient

    client = EmotionsClient(url, token)
    try:
        emit_results(client, client.job(job_id), fmt, output, source=job_id, summary=False)
    except ApiClientError as exc:
        client_exit(exc)


def _upload_files(paths: tuple[Path, ...]) -> list[tuple[Path, str]]:
    """Each file with the name it is uploaded as: a folder's images keep their path below it
    (``Angry/0.jpg``), prefixed with the folder's name when several folders are given, so no
    two files of one job share a name and results match files."""
    from face_emotions.data.images import iter_image_files

    folders = sum(path.is_dir() for path in paths)
    files: list[tuple[Path, str]] = []
    for path in paths:
        if path.is_dir():
            for image in iter_image_files(path):
                relative = image.relative_to(path).as_posix()
                files.append(
                    (image, f"{path.resolve().name}/{relative}" if folders > 1 else relative)
                )
        elif path.is_file():
            files.append((path, path.name))
        else:
            raise UserError(f"{path}: no such file or directory")
    if not files:
        raise UserError("no image files to upload")
    return files


def follow_with_progress(client, job_id: str) -> dict:
    from rich.progress import BarColumn
    from rich.progress import MofNCompleteColumn
    from rich.progress import Progress
    from rich.progress import TextColumn
    from rich.progress import TimeElapsedColumn

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=stderr_console(), transient=False) as progress:
        task = progress.add_task(f"job {job_id[:8]}", total=None, state="")

        def update(job: dict) -> None:
            progress.update(
                task,
                total=job["total"],
                completed=job["done"] + job["failed"],
                state=f"{job['status']} ({job['failed']} failed)",
            )

        return client.wait(job_id, on_progress=update)


def emit_results(
    client,
    job: dict,
    fmt: str,
    output: Path | None,
    *,
    source: str,
    summary: bool = True,
) -> None:
    from face_emotions.serving.seed_format import inference_document
    from face_emotions.serving.seed_format import summary_table

    if fmt != "json":
        text = client.export(job["id"], fmt)
    else:
        items = client.results(job["id"])
        predictions = [_seed_record(i) for i in items if i.get("status") == "succeeded"]
        errors = [
            {"image_path": i["image_path"], "error": i.get("error") or "failed"}
            for i in items
            if i.get("status") != "succeeded"
        ]
        versions = ",".join(str(v) for v in job.get("model_versions") or []) or "?"
        document = inference_document(
            f"models:/face-emotion (versions {versions})", source, predictions, errors
        )
        document["job_id"] = job["id"]
        document["status"] = job["status"]
        text = json.dumps(document, indent=4)
        if summary:
            click.echo(summary_table(predictions, errors), err=True)
    if output:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text if text.endswith("\n") else text + "\n")
        click.echo(f"results written to {output}", err=True)
    else:
        click.echo(text)


def _seed_record(item: dict) -> dict:
    """The seed's record of a result (as ``infer`` prints it), with its faces."""
    keys = ("image_path", "predicted_class", "predicted_emotion", "confidence", "all_probabilities")
    record = {key: item[key] for key in keys}
    for key in ("faces_found", "image_size", "faces"):
        if key in item:
            record[key] = item[key]
    return record


@click.command("jobs")
@api_options
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000))
def list_jobs(url: str | None, token: str | None, limit: int) -> None:
    """List jobs, newest first (your own, or every job with an admin token)."""
    from face_emotions.cli.api_client import SHORT_ID_CHARS
    from face_emotions.cli.api_client import ApiClientError
    from face_emotions.cli.api_client import EmotionsClient

    client = EmotionsClient(url, token)
    try:
        page = client.jobs(limit=limit)
    except ApiClientError as exc:
        client_exit(exc)
    if not page["items"]:
        click.echo("no jobs yet: face-emotions submit PATH", err=True)
        return
    click.echo(f"{'JOB':<10}{'STATUS':<23}{'DONE':>12}  {'CREATED':<17}SOURCE")
    for job in page["items"]:
        done = f"{job['done'] + job['failed']}/{job['total']}"
        created = job["created_at"][:16].replace("T", " ")
        click.echo(
            f"{job['id'][:SHORT_ID_CHARS]:<10}{job['status']:<23}{done:>12}  {created:<17}"
            f"{job['source_type']}: {job['source']}"
        )
    if page["total"] > len(page["items"]):
        click.echo(f"({page['total'] - len(page['items'])} older; --limit shows more)", err=True)


@click.command()
@click.argument("job_id")
@api_options
def cancel(job_id: str, url: str | None, token: str | None) -> None:
    """Cancel a queued or running job (JOB_ID may be the 8-character short id)."""
    from face_emotions.cli.api_client import ApiClientError
    from face_emotions.cli.api_client import EmotionsClient

    client = EmotionsClient(url, token)
    try:
        job = client.cancel(job_id)
    except ApiClientError as exc:
        client_exit(exc)
    click.echo(f"job {job['id']}: {job['status']} ({job['done']}/{job['total']} classified)")
