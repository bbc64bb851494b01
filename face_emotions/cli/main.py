"""``face-emotions`` console script: sample data, local inference, registry commands.

Errors a user can cause (missing path, unknown model, bad option) exit with code 2 and one clear
line on stderr; results go to stdout (or ``--output``) so they can be piped.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import datetime
from pathlib import Path

import click

from face_emotions import __version__


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
    from face_emotions.data.sample_faces import write_sample_dataset

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

    from face_emotions.data.images import iter_image_files
    from face_emotions.modeling.bundle import BundleError, load_model_source
    from face_emotions.registry.mlflow_registry import RegistryError
    from face_emotions.serving.decode_ahead import iter_decoded_batches
    from face_emotions.serving.predictor import Predictor, resolve_device
    from face_emotions.serving.seed_format import (
        configuration_block,
        inference_document,
        prediction_record,
        summary_table,
    )

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
    from face_emotions.registry.mlflow_registry import Registry

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
    from face_emotions.registry.mlflow_registry import Registry, RegistryError

    registry = Registry()
    try:
        candidate = registry.get_version(version)
    except RegistryError as exc:
        raise UserError(str(exc)) from exc
    decision = registry.promote(candidate, mode)
    click.echo(("promoted: " if decision.promote else "not promoted: ") + decision.reason)


@main.group()
def db() -> None:
    """Database schema (Alembic migrations)."""


@db.command("upgrade")
@click.option("--revision", default="head", show_default=True)
def db_upgrade(revision: str) -> None:
    """Apply migrations to EMOTIONS_DATABASE_URL (default: the SQLite file under var/)."""
    from face_emotions.jobs.migrate import current_revision, upgrade
    from face_emotions.settings import get_settings

    url = get_settings().resolved_database_url
    upgrade(url, revision)
    click.echo(f"database at {_safe_url(url)} is at revision {current_revision(url)}", err=True)


@db.command("current")
def db_current() -> None:
    """Print the applied and the newest revision."""
    from face_emotions.jobs.migrate import current_revision, head_revision
    from face_emotions.settings import get_settings

    url = get_settings().resolved_database_url
    click.echo(f"current: {current_revision(url)}  head: {head_revision(url)}")


@main.group()
def tokens() -> None:
    """API tokens in EMOTIONS_DATABASE_URL: create (shown once), list, revoke.

    Roles: submit (create jobs, read its own) and admin (every job, training, promotion).
    """


def _token_database() -> str:
    """The database URL, at the newest schema.

    Applies migrations when EMOTIONS_MIGRATE_ON_START allows it (the API would apply them at
    its next start anyway); otherwise asks the user to run ``face-emotions db upgrade``.
    """
    from face_emotions.jobs.migrate import current_revision, head_revision, upgrade
    from face_emotions.settings import get_settings

    settings = get_settings()
    url = settings.resolved_database_url
    try:
        behind = current_revision(url) != head_revision(url)
        if behind and settings.migrate_on_start:
            upgrade(url)
            behind = False
    except Exception as exc:
        raise UserError(
            f"cannot use the database at {_safe_url(url)}: {type(exc).__name__}"
        ) from exc
    if behind:
        raise UserError(
            f"the database at {_safe_url(url)} is not at the newest schema; "
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
    from face_emotions.jobs.database import create_db_engine, session_factory
    from face_emotions.jobs.tokens import MAX_NAME_CHARS, create_token

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
    from face_emotions.jobs.database import create_db_engine, session_factory
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
    from face_emotions.jobs.database import create_db_engine, session_factory
    from face_emotions.jobs.tokens import get_token, revoke_token

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


API_OPTIONS = [
    click.option("--url", envvar="EMOTIONS_API_URL", help="API base URL (default 127.0.0.1:8000)."),
    click.option("--token", envvar="EMOTIONS_API_TOKEN", help="API token (Bearer)."),
]


def api_options(command):
    for option in reversed(API_OPTIONS):
        command = option(command)
    return command


@main.command()
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
    wait: bool,
    output: Path | None,
    fmt: str,
) -> None:
    """Submit images, folders (uploaded) or a .zip as one batch job."""
    from face_emotions.cli.api_client import ApiClientError, EmotionsClient

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
            )
        else:
            job = client.submit_files(
                _upload_files(paths),
                batch_size=batch_size,
                model_version=model_version,
                idempotency_key=idempotency_key,
            )
        click.echo(f"job {job['id']}: {job['status']}, {job['total']} images", err=True)
        if job.get("warning"):
            click.echo(f"warning: {job['warning']}", err=True)
        if not wait:
            click.echo(job["id"])
            return
        finished = follow_with_progress(client, job["id"])
        emit_results(client, finished, fmt, output, source=", ".join(map(str, paths)))
    except ApiClientError as exc:
        _client_exit(exc)


@main.command()
@click.argument("job_id")
@api_options
@click.option("--wait", is_flag=True, help="Follow the job with a progress bar until it ends.")
def status(job_id: str, url: str | None, token: str | None, wait: bool) -> None:
    """Show a job's status, counts and model versions."""
    from face_emotions.cli.api_client import ApiClientError, EmotionsClient

    client = EmotionsClient(url, token)
    try:
        job = follow_with_progress(client, job_id) if wait else client.job(job_id)
    except ApiClientError as exc:
        _client_exit(exc)
    click.echo(json.dumps(job, indent=2))


@main.command()
@click.argument("job_id")
@api_options
@click.option("--format", "fmt", default="json", type=click.Choice(["json", "jsonl", "csv"]))
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path))
def results(job_id: str, url: str | None, token: str | None, fmt: str, output: Path | None) -> None:
    """Print or save a job's results (json: the seed's document; jsonl/csv: exports)."""
    from face_emotions.cli.api_client import ApiClientError, EmotionsClient

    client = EmotionsClient(url, token)
    try:
        emit_results(client, client.job(job_id), fmt, output, source=job_id, summary=False)
    except ApiClientError as exc:
        _client_exit(exc)


def _upload_files(paths: tuple[Path, ...]) -> list[Path]:
    from face_emotions.data.images import iter_image_files

    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += iter_image_files(path)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"{path}: no such file or directory")
    if not files:
        raise UserError("no image files to upload")
    return files


def follow_with_progress(client, job_id: str) -> dict:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[state]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=_stderr_console(), transient=False) as progress:
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
    from face_emotions.serving.seed_format import inference_document, summary_table

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
    keys = ("image_path", "predicted_class", "predicted_emotion", "confidence", "all_probabilities")
    return {key: item[key] for key in keys}


def _client_exit(exc) -> None:
    click.echo(f"error: {exc}", err=True)
    sys.exit(2 if exc.user_error else 1)


def _safe_url(url: str) -> str:
    """Hide a password in a database URL before printing it."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<database>"


def _stderr_console():
    from rich.console import Console

    return Console(stderr=True)


if __name__ == "__main__":
    main()
