"""Training runs and promotion through the REST API (temporary SQLite, fake queue and registry),
and the trainer's task logic (``training.service.execute_run``) on the same database with a fake
``run_training``: admin auth, validation, dispatch, idempotent progress, broadcasts."""

from __future__ import annotations

import re
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from flask.testing import FlaskClient
from sqlalchemy import select

from api import create_app
from api.extensions import services
from face_emotions.jobs import training_runs as db_runs
from face_emotions.jobs.schema import TrainingRun
from face_emotions.registry.mlflow_registry import VersionInfo
from face_emotions.registry.promotion import PromotionDecision
from face_emotions.settings import Settings
from tests.fakes import ChunkOnlyBroker as JobOnlyQueue
from tests.fakes import FakeBroker as FakeQueue
from tests.fakes import FakeRegistry

TOKEN = "s3cret-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RUNS = "/api/v1/training-runs"


@pytest.fixture
def data_root(tmp_path: Path) -> Path:
    (tmp_path / "data" / "faces" / "Happy").mkdir(parents=True)
    return tmp_path / "data"


@pytest.fixture
def settings(tmp_path: Path, data_root: Path) -> Settings:
    return Settings(
        var_dir=tmp_path / "var", data_root=data_root, admin_token=TOKEN, broker_url="memory://"
    )


@pytest.fixture
def queue() -> FakeQueue:
    return FakeQueue()


@pytest.fixture
def registry() -> FakeRegistry:
    return FakeRegistry([1, 2, 3], champion=1)


@pytest.fixture
def app(settings: Settings, queue: FakeQueue, registry: FakeRegistry):
    return create_app(settings, broker=queue, registry_factory=lambda: registry)


@pytest.fixture
def client(app) -> FlaskClient:
    return app.test_client()


def assert_error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.get_data(as_text=True)
    body = response.get_json()
    assert set(body) == {"error"} and body["error"]["code"] == code, body
    return body["error"]["message"]


def rows(app) -> list[TrainingRun]:
    with app.app_context(), services().sessions() as session:
        return list(session.scalars(select(TrainingRun).order_by(TrainingRun.created_at)))


@pytest.fixture
def trainer_alive(app, settings: Settings) -> None:
    """A trainer's heartbeat, with this API's data root: submissions need not warn."""
    _heartbeat(app, "trainer@host", "training", str(settings.resolved_data_root))


def submit(client: FlaskClient, **body: Any):
    return client.post(RUNS, json={"data": "faces", **body}, headers=AUTH)


# -- authentication ---------------------------------------------------------------------------

ADMIN_ROUTES = [
    ("post", RUNS, {"data": "faces"}),
    ("get", RUNS, None),
    ("get", f"{RUNS}/{uuid.UUID(int=1)}", None),
    ("post", "/api/v1/models/2/promote", None),
]


@pytest.mark.parametrize(("method", "url", "body"), ADMIN_ROUTES)
@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {TOKEN}"},
        {"Authorization": "Bearer"},
        {"Authorization": f"Bearer {TOKEN}x"},
    ],
)
def test_admin_routes_need_the_token(
    client: FlaskClient, queue: FakeQueue, registry: FakeRegistry, method, url, body, headers
) -> None:
    response = getattr(client, method)(url, json=body, headers=headers)
    assert_error(response, 401, "unauthorized")
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert queue.training == [] and queue.broadcasts == 0
    assert registry.aliases == {"champion": 1}


def test_auth_is_checked_before_the_body(client: FlaskClient, app) -> None:
    """A caller without the token learns nothing about what a valid request looks like."""
    response = client.post(RUNS, json={"model": "nope", "epochs": 0})
    assert_error(response, 401, "unauthorized")
    assert rows(app) == []


@pytest.mark.parametrize(("method", "url", "body"), ADMIN_ROUTES)
@pytest.mark.parametrize("token", [None, ""])
def test_without_a_bootstrap_token_only_database_tokens_work(
    tmp_path: Path, queue: FakeQueue, registry: FakeRegistry, method, url, body, token
) -> None:
    """No EMOTIONS_ADMIN_TOKEN: the old token is just an unknown one (401), and an admin
    token from the database still reaches the admin routes."""
    from face_emotions.jobs import tokens as db_tokens

    (tmp_path / "data" / "faces").mkdir(parents=True)
    settings = Settings(
        var_dir=tmp_path / "var",
        data_root=tmp_path / "data",
        admin_token=token,
        broker_url="memory://",
    )
    app = create_app(settings, broker=queue, registry_factory=lambda: registry)
    client = app.test_client()
    assert_error(getattr(client, method)(url, json=body, headers=AUTH), 401, "unauthorized")
    empty = {"Authorization": "Bearer "}
    assert_error(getattr(client, method)(url, json=body, headers=empty), 401, "unauthorized")
    assert registry.aliases == {"champion": 1}

    with app.app_context(), services().sessions() as session:
        created = db_tokens.create_token(session, role="admin", name="ops")
        session.commit()
    headers = {"Authorization": f"Bearer {created.token}"}
    response = getattr(client, method)(url, json=body, headers=headers)
    # The unknown run id answers 404; everything else succeeds.
    assert response.status_code in {200, 202, 404}, response.get_json()
    assert response.status_code != 404 or "/training-runs/" in url


def test_api_routes_need_a_token_probes_do_not(client: FlaskClient) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    for url in ("/api/v1/models", "/api/v1/jobs"):
        assert_error(client.get(url), 401, "unauthorized")
        assert client.get(url, headers=AUTH).status_code == 200


# -- submission -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"model": "alexnet"}, "model"),
        ({"epochs": 0}, "epochs"),
        ({"epochs": 501}, "epochs"),
        ({"epochs": "many"}, "epochs"),
        ({"promote": "sometimes"}, "promote"),
        ({"data": ""}, "data"),
        ({"data": None}, "data"),
        ({"overrides": "training.lr=0.1"}, "overrides"),
        ({"overrides": [f"training.lr=0.{i}" for i in range(51)]}, "overrides"),
        ({"overrides": ["data.path=/etc"]}, "overrides"),
        ({"overrides": ["++data.path=/etc"]}, "overrides"),
        ({"overrides": ["~data.path"]}, "overrides"),
        ({"overrides": ["data=default"]}, "overrides"),
        ({"overrides": ["data.hash_cache=/tmp/x.json"]}, "overrides"),
        ({"overrides": ["promote=force"]}, "overrides"),
        ({"overrides": ["output_dir=/tmp/elsewhere"]}, "overrides"),
        ({"overrides": ["hydra.run.dir=/tmp"]}, "overrides"),
        ({"overrides": ["+hydra/launcher=basic"]}, "overrides"),
        ({"overrides": ["model=resnet18"]}, "overrides"),
        ({"overrides": ["training.lr"]}, "overrides"),
        ({"overrides": ["=0.1"]}, "overrides"),
        ({"overrides": ["training lr=0.1"]}, "overrides"),
        ({"overrides": ["training.lr=1\nhydra.run.dir=/"]}, "overrides"),
        ({"overrides": ["run_name=${oc.env:AWS_SECRET_ACCESS_KEY}"]}, "overrides"),
        ({"overrides": [12]}, "overrides"),
        ({"surprise": 1}, "surprise"),
    ],
)
def test_invalid_fields_are_refused_with_the_field(
    client: FlaskClient, app, queue: FakeQueue, body: dict[str, Any], field: str
) -> None:
    message = assert_error(submit(client, **body), 400, "validation_error")
    assert message.startswith(f"{field}"), message
    assert rows(app) == [] and queue.training == []


def test_unknown_model_names_the_choices(client: FlaskClient) -> None:
    message = assert_error(submit(client, model="alexnet"), 400, "validation_error")
    assert "efficientnet_lite0" in message and "cnn" in message


def test_missing_data_is_refused(client: FlaskClient) -> None:
    response = client.post(RUNS, json={"model": "cnn"}, headers=AUTH)
    assert "data" in assert_error(response, 400, "validation_error")


@pytest.mark.parametrize(
    ("folder", "code"),
    [
        ("/etc", "invalid_path"),
        ("../outside", "invalid_path"),
        ("faces/../../outside", "invalid_path"),
        ("C:\\data", "invalid_path"),
        ("nope", "not_found"),
        ("faces/Happy/missing", "not_found"),
        ("link-out", "invalid_path"),
        ("file.txt", "not_found"),
    ],
)
def test_data_folder_must_exist_under_the_data_root(
    client: FlaskClient, app, data_root: Path, queue: FakeQueue, folder: str, code: str
) -> None:
    outside = data_root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (data_root / "link-out").symlink_to(outside)
    (data_root / "file.txt").write_text("not a folder")
    message = assert_error(submit(client, data=folder), 400, code)
    assert message.startswith("data: ")
    assert rows(app) == [] and queue.training == []


def test_run_is_stored_and_enqueued(
    client: FlaskClient, app, queue: FakeQueue, trainer_alive: None
) -> None:
    response = submit(
        client,
        model="cnn",
        epochs=6,
        data=" faces ",
        promote="never",
        # Quoted: unquoted, Hydra reads "a b,c" as ambiguous, and the API refuses it (below).
        overrides=["model.image_size=64", "training=fast", "+training.extra='a b,c'"],
    )
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    assert response.headers["Location"] == f"{RUNS}/{body['id']}"
    assert body["links"]["self"] == response.headers["Location"]
    assert queue.training == [body["id"]]
    assert "warning" not in body
    assert body["status"] == "queued" and body["attempts"] == 0
    assert (body["data"], body["promote"], body["requested_by"]) == ("faces", "never", "admin")
    assert body["overrides"] == [
        "model=cnn",
        "training.max_epochs=6",
        "model.image_size=64",
        "training=fast",
        "+training.extra='a b,c'",
    ]
    assert body["registered_version"] is None and body["promoted"] is False
    assert body["started_at"] is None and body["duration_seconds"] is None
    [row] = rows(app)
    assert str(row.id) == body["id"] and row.dispatched_at is not None


def test_defaults(client: FlaskClient, queue: FakeQueue) -> None:
    body = submit(client).get_json()
    assert (body["promote"], body["overrides"]) == ("auto", [])
    assert queue.training == [body["id"]]


def test_broker_down_leaves_the_run_queued_and_the_next_submission_sends_it(
    client: FlaskClient, app, queue: FakeQueue, trainer_alive: None
) -> None:
    queue.up = False
    response = submit(client, epochs=1)
    assert response.status_code == 202
    first = response.get_json()
    assert "broker is unreachable" in first["warning"]
    assert first["status"] == "queued" and queue.training == []
    [row] = rows(app)
    assert row.dispatched_at is None

    queue.up = True
    second = submit(client, epochs=2).get_json()
    assert "warning" not in second
    assert queue.training == [first["id"], second["id"]]  # oldest first, each once
    submit(client, epochs=3)
    assert queue.training.count(first["id"]) == 1
    assert all(row.dispatched_at is not None for row in rows(app))


def test_training_needs_a_training_queue(
    tmp_path: Path, settings: Settings, registry: FakeRegistry
) -> None:
    app = create_app(settings, broker=JobOnlyQueue(), registry_factory=lambda: registry)
    response = app.test_client().post(RUNS, json={"data": "faces"}, headers=AUTH)
    assert_error(response, 503, "training_unavailable")


# -- reading runs -----------------------------------------------------------------------------


def test_list_is_paginated_newest_first(client: FlaskClient) -> None:
    ids = [submit(client, epochs=n).get_json()["id"] for n in (1, 2, 3)]
    body = client.get(RUNS, headers=AUTH).get_json()
    assert [item["id"] for item in body["items"]] == ids[::-1]
    assert (body["total"], body["page"], body["limit"]) == (3, 1, 20)
    page = client.get(f"{RUNS}?limit=2&page=2", headers=AUTH).get_json()
    assert [item["id"] for item in page["items"]] == [ids[0]]
    clamped = client.get(f"{RUNS}?limit=0&page=-4", headers=AUTH).get_json()
    assert (clamped["page"], clamped["limit"]) == (1, 1)


def test_detail_shows_what_the_trainer_recorded(client: FlaskClient, app) -> None:
    run_id = uuid.UUID(submit(client, model="cnn").get_json()["id"])
    with app.app_context(), services().sessions() as session:
        assert db_runs.mark_running(session, run_id) is not None
        db_runs.mark_succeeded(
            session,
            run_id,
            mlflow_run_id="abc123",
            registered_version=7,
            promoted=True,
            promotion_reason="beats the champion",
            metrics={"test_accuracy": 0.93, "passed_targets": True},
        )
        session.commit()
    body = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()
    assert body["status"] == "succeeded" and body["attempts"] == 1
    assert (body["mlflow_run_id"], body["registered_version"], body["promoted"]) == (
        "abc123",
        7,
        True,
    )
    assert body["promotion_reason"] == "beats the champion"
    assert body["metrics"] == {"test_accuracy": 0.93, "passed_targets": True}
    assert body["error"] is None
    assert body["started_at"] and body["finished_at"] and body["duration_seconds"] >= 0


def test_unknown_run_is_404(client: FlaskClient) -> None:
    assert_error(client.get(f"{RUNS}/{uuid.uuid4()}", headers=AUTH), 404, "not_found")
    assert client.get(f"{RUNS}/not-a-uuid", headers=AUTH).status_code == 404


# -- promotion --------------------------------------------------------------------------------


def test_promote_moves_the_alias_and_broadcasts(
    client: FlaskClient, queue: FakeQueue, registry: FakeRegistry
) -> None:
    response = client.post("/api/v1/models/3/promote", headers=AUTH)
    assert response.status_code == 200, response.get_json()
    assert response.get_json() == {"version": 3, "previous": 1, "alias": "champion"}
    assert registry.aliases == {"champion": 3}
    assert queue.broadcasts == 1
    listing = client.get("/api/v1/models", headers=AUTH).get_json()
    assert listing["champion"] == 3


def test_promote_unknown_version_is_404(
    client: FlaskClient, queue: FakeQueue, registry: FakeRegistry
) -> None:
    assert_error(client.post("/api/v1/models/42/promote", headers=AUTH), 404, "not_found")
    assert registry.aliases == {"champion": 1} and queue.broadcasts == 0


def test_promote_without_a_champion_and_with_the_broker_down(
    client: FlaskClient, queue: FakeQueue, registry: FakeRegistry
) -> None:
    registry.aliases.clear()
    queue.up = False  # workers poll the alias anyway: not an error
    response = client.post("/api/v1/models/2/promote", headers=AUTH)
    assert response.status_code == 200
    assert response.get_json() == {"version": 2, "previous": None, "alias": "champion"}
    assert registry.aliases == {"champion": 2}


def test_promote_with_the_registry_down_is_503(client: FlaskClient, registry) -> None:
    registry.up = False
    assert_error(client.post("/api/v1/models/2/promote", headers=AUTH), 503, "registry_unavailable")


# -- OpenAPI ----------------------------------------------------------------------------------


def test_openapi_documents_the_bearer_scheme(client: FlaskClient) -> None:
    spec = client.get("/openapi.json").get_json()
    assert spec["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    operations = [
        spec["paths"][RUNS]["post"],
        spec["paths"][RUNS]["get"],
        spec["paths"][f"{RUNS}/{{run_id}}"]["get"],
        spec["paths"]["/api/v1/models/{version}/promote"]["post"],
    ]
    for operation in operations:
        assert operation["security"] == [{"bearerAuth": []}]
        assert {"401", "403"} <= set(operation["responses"])
    assert spec["paths"]["/api/v1/models"]["get"]["security"] == [{"bearerAuth": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    body = spec["paths"][RUNS]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["$ref"].endswith("/TrainingRunIn")


# -- the trainer's task -----------------------------------------------------------------------


def _version(number: int) -> VersionInfo:
    return VersionInfo("face-emotion", number, "file:///x", "run", {}, ())


class FakeResult:
    """What ``run_training`` returns, as far as the service reads it."""

    def __init__(self, *, promote: bool) -> None:
        self.run_id = "mlflow-run-1"
        self.version = _version(5)
        reason = "promote=force" if promote else "promote=never"
        self.promotion = PromotionDecision(promote, reason, previous=None, candidate=5)

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "version": 5,
            "promoted": self.promotion.promote,
            "passed_targets": False,
            "test_accuracy": 0.81,
            "test_weighted_f1": 0.8,
        }


class FinishedProcess:
    """A run's process that already ran (in the test's own process) and exited with ``code``."""

    def __init__(self, code: int) -> None:
        self.code = code
        self.stopped = False

    def wait(self, timeout: float) -> int | None:
        return self.code

    def stop(self) -> None:
        self.stopped = True


class TrainingProcess:
    """A run's process that trains until stopped (``wait`` never returns an exit code)."""

    def __init__(self, on_wait: Any = None) -> None:
        self.stopped = False
        self.on_wait = on_wait

    def wait(self, timeout: float) -> int | None:
        if self.on_wait is not None:
            self.on_wait()
        return -15 if self.stopped else None

    def stop(self) -> None:
        self.stopped = True


@pytest.fixture
def trainer(app, settings: Settings, client: FlaskClient):
    """The trainer's task (``supervise``) bound to the API's database; the run's process is
    :func:`train_and_record` run in this process, with a fake ``run_training``."""
    from training.run_record import train_and_record
    from training.supervisor import supervise

    calls: dict[str, list[Any]] = {"configs": [], "broadcasts": []}
    with app.app_context():
        sessions = services().sessions

    def run(run_id: str, train=None, launch=None, dispatch: str | None = None) -> str | None:
        def fake_train(cfg, hooks):
            """Promotes, as ``run_training`` with ``promote=force`` would: through ``announce``."""
            calls["configs"].append(cfg)
            hooks.announce()
            return FakeResult(promote=True)

        def in_process(rid: uuid.UUID) -> FinishedProcess:
            status = train_and_record(
                rid,
                settings=settings,
                sessions=sessions,
                train=train or fake_train,
                announce=lambda: calls["broadcasts"].append(1),
            )
            return FinishedProcess(0 if status == "succeeded" else 1)

        return supervise(
            uuid.UUID(run_id),
            settings=settings,
            sessions=sessions,
            launch=launch or in_process,
            poll_seconds=0,
            dispatch=dispatch,
        )

    run.calls = calls  # type: ignore[attr-defined]
    run.sessions = sessions  # type: ignore[attr-defined]
    return run


def test_task_trains_records_and_broadcasts(
    client: FlaskClient, settings: Settings, data_root: Path, trainer
) -> None:
    run_id = submit(
        client, model="cnn", epochs=2, promote="force", overrides=["training.lr=0.005"]
    ).get_json()["id"]
    assert trainer(run_id) == "succeeded"
    [cfg] = trainer.calls["configs"]
    assert cfg.model.name == "cnn" and cfg.training.max_epochs == 2
    assert cfg.training.lr == 0.005 and cfg.promote == "force"
    assert Path(cfg.data.path) == (data_root / "faces").resolve()
    assert Path(cfg.output_dir) == settings.var_dir / "runs" / run_id
    assert cfg.training.progress_bar is False
    assert trainer.calls["broadcasts"] == [1]

    body = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()
    assert body["status"] == "succeeded" and body["attempts"] == 1
    assert (body["mlflow_run_id"], body["registered_version"], body["promoted"]) == (
        "mlflow-run-1",
        5,
        True,
    )
    assert body["metrics"] == {
        "test_accuracy": 0.81,
        "test_weighted_f1": 0.8,
        "passed_targets": False,
    }

    # The broker delivers the task again (a lost ack): the finished run is left alone.
    assert trainer(run_id) is None
    assert len(trainer.calls["configs"]) == 1 and trainer.calls["broadcasts"] == [1]
    assert client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()["attempts"] == 1


def test_task_does_not_broadcast_without_a_promotion(client: FlaskClient, trainer) -> None:
    run_id = submit(client, promote="never").get_json()["id"]
    assert trainer(run_id, train=lambda cfg, hooks: FakeResult(promote=False)) == "succeeded"
    assert trainer.calls["broadcasts"] == []
    assert client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()["promoted"] is False


def test_task_restarts_a_run_whose_trainer_died(client: FlaskClient, app, trainer) -> None:
    run_id = submit(client).get_json()["id"]
    with app.app_context(), services().sessions() as session:
        db_runs.mark_running(session, uuid.UUID(run_id))
        session.commit()
    assert trainer(run_id) == "succeeded"
    assert client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()["attempts"] == 2


def test_a_run_sent_twice_trains_once(
    client: FlaskClient, app, settings: Settings, queue: FakeQueue, trainer
) -> None:
    """Issue 14: runs the broker never had are sent again (by the sweeper, the next submission,
    a starting trainer). A send that raised after the broker took the message leaves two
    copies of the run in the queue; only the copy of its latest sending starts it, so two
    trainers never train it at once."""
    from training.run_record import train_and_record

    run_id = submit(client).get_json()["id"]
    # The first send raised after the broker took it: released, then sent again.
    with app.app_context(), services().sessions() as session:
        db_runs.release_dispatch(session, uuid.UUID(run_id))
        session.commit()
    sent, error = db_runs.dispatch_pending(trainer.sessions, queue.send_training_run)
    assert sent == [uuid.UUID(run_id)] and error is None
    assert queue.training == [run_id, run_id]
    stale, current = queue.dispatches
    assert stale and current and stale != current

    assert trainer(run_id, dispatch=stale) is None  # the stale copy comes first: nothing
    assert rows(app)[0].status == "queued" and rows(app)[0].attempts == 0

    launches: list[uuid.UUID] = []
    copies: list[str | None] = []

    def launch(rid: uuid.UUID) -> FinishedProcess:
        launches.append(rid)
        if len(launches) == 1:  # while it trains, another trainer gets the stale copy
            copies.append(trainer(run_id, dispatch=stale))
        status = train_and_record(
            rid,
            settings=settings,
            sessions=trainer.sessions,
            train=lambda cfg, hooks: FakeResult(promote=False),
        )
        return FinishedProcess(0 if status == "succeeded" else 1)

    assert trainer(run_id, launch=launch, dispatch=current) == "succeeded"
    assert launches == [uuid.UUID(run_id)] and copies == [None]
    body = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()
    assert body["status"] == "succeeded" and body["attempts"] == 1
    # The current copy delivered again (a lost ack) finds the run finished.
    assert trainer(run_id, dispatch=current) is None


def test_the_sweeper_sends_runs_the_broker_never_had(
    client: FlaskClient, app, queue: FakeQueue, trainer
) -> None:
    """A run younger than a few seconds is its request's to send; an older unsent one is the
    sweeper's, with its dispatch stamp."""
    from datetime import timedelta

    from face_emotions.jobs.recovery import dispatch_stranded_runs
    from face_emotions.jobs.schema import utcnow

    queue.up = False
    run_id = submit(client).get_json()["id"]
    assert queue.training == [] and rows(app)[0].dispatched_at is None
    queue.up = True
    assert dispatch_stranded_runs(trainer.sessions, queue.send_training_run) == ([], None)
    later = utcnow() + timedelta(seconds=30)
    assert dispatch_stranded_runs(trainer.sessions, queue.send_training_run, now=later) == (
        [run_id],
        None,
    )
    [row] = rows(app)
    assert queue.training == [run_id]
    assert queue.dispatches == [db_runs.dispatch_token(row.dispatched_at)]
    assert dispatch_stranded_runs(trainer.sessions, queue.send_training_run, now=later) == (
        [],
        None,
    )


def test_bad_override_fails_the_run_with_hydras_message(client: FlaskClient, app, trainer) -> None:
    """A run the API accepted before its config changed (the API refuses such runs now)."""
    with app.app_context(), services().sessions() as session:
        run = db_runs.create_run(
            session,
            data_path="faces",
            overrides=["training.no_such_key=1"],
            promote="auto",
            requested_by="admin",
        )
        session.commit()
        run_id = str(run.id)
    assert trainer(run_id) == "failed"
    assert trainer.calls["configs"] == []
    body = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()
    assert body["status"] == "failed" and body["finished_at"]
    assert body["error"].startswith("invalid training configuration: ")
    assert "no_such_key" in body["error"]
    assert trainer(run_id) is None  # no retry


def test_training_error_fails_the_run(client: FlaskClient, trainer) -> None:
    run_id = submit(client).get_json()["id"]

    def explode(cfg, hooks):
        raise ValueError("no images found under faces")

    assert trainer(run_id, train=explode) == "failed"
    body = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()
    assert body["error"] == "ValueError: no images found under faces"
    assert trainer.calls["broadcasts"] == []


def test_task_resolves_the_folder_under_its_own_data_root(
    client: FlaskClient, data_root: Path, trainer
) -> None:
    run_id = submit(client).get_json()["id"]
    (data_root / "faces" / "Happy").rmdir()
    (data_root / "faces").rmdir()
    assert trainer(run_id) == "failed"
    error = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()["error"]
    assert "does not exist" in error
    # It names the root the trainer looked in: an API and a trainer that disagree show it.
    assert str(data_root.resolve()) in error and "EMOTIONS_DATA_ROOT" in error


def test_unknown_run_id_is_ignored(trainer) -> None:
    assert trainer(str(uuid.uuid4())) is None


def test_a_starting_trainer_sends_runs_the_broker_missed(
    client: FlaskClient, app, settings: Settings, queue: FakeQueue, monkeypatch
) -> None:
    import training.service as service

    queue.up = False
    run_id = submit(client).get_json()["id"]
    sent: list[str] = []
    monkeypatch.setattr(service, "settings", settings)
    monkeypatch.setattr(
        service.broker, "send_training_run", lambda run_id, dispatch: sent.append(run_id)
    )
    service._dispatch_pending(sender=SimpleNamespace(app=service.app))
    assert sent == [run_id]
    service._dispatch_pending(sender=SimpleNamespace(app=service.app))
    assert len(sent) == 1  # claimed once, sent once
    service._dispatch_pending(sender=SimpleNamespace(app=object()))  # another app's worker
    assert len(sent) == 1


def test_trainer_celery_settings() -> None:
    from training.service import TRAIN_TASK
    from training.service import celery_config

    config = celery_config(Settings(visibility_timeout=3600, training_queue="gpu-training"))
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1
    assert config["broker_transport_options"]["visibility_timeout"] == 6 * 3600
    # Inference workers restore the default unacked keys after 1 h: not ours.
    assert config["broker_transport_options"]["unacked_key"] != "unacked"
    assert config["task_routes"] == {TRAIN_TASK: {"queue": "gpu-training"}}
    longer = celery_config(Settings(visibility_timeout=86400))
    assert longer["broker_transport_options"]["visibility_timeout"] == 86400


def test_services_register_the_protocol_names() -> None:
    """Senders and receivers share one protocol module: the names each service registers are
    the ones the broker client sends."""
    import training.service
    import worker.app
    from face_emotions.jobs import protocol

    assert protocol.TRAIN_TASK in training.service.app.tasks
    worker.app.app.loader.import_default_modules()  # the task modules, as a starting worker
    assert protocol.CLASSIFY_TASK in worker.app.app.tasks
    from celery.worker.control import Panel

    assert protocol.RELOAD_COMMAND in Panel.data


def test_broker_client_sends_training_runs_and_broadcasts() -> None:
    from face_emotions.jobs.broker import BrokerClient
    from face_emotions.jobs.protocol import TRAIN_TASK

    broker = BrokerClient("memory://", training_queue="training-test")
    broker.send_training_run("run-1")
    with broker.connection() as connection:
        simple = connection.SimpleQueue("training-test")
        try:
            message = simple.get(timeout=2)
            assert message.headers["task"] == TRAIN_TASK
            assert message.payload[1] == {"run_id": "run-1"}
            message.ack()
        finally:
            simple.close()
    broker.broadcast_reload()  # memory transport: must not raise


def test_broker_client_broadcast_with_the_broker_down_fails_fast() -> None:
    import time

    from face_emotions.jobs.broker import BrokerClient

    queue = BrokerClient("redis://127.0.0.1:1/0")
    started = time.monotonic()
    with pytest.raises(Exception):  # noqa: B017 - kombu's OperationalError or a socket error
        queue.broadcast_reload()
    with pytest.raises(Exception):  # noqa: B017
        queue.send_training_run("run-1")
    assert time.monotonic() - started < 20


# -- config checked at submission, progress, cancellation, trainers ----------------------------


def test_overrides_the_trainer_would_refuse_are_refused_at_submission(
    client: FlaskClient, queue: FakeQueue
) -> None:
    """The README says data.* overrides are refused: before, the API took this one and the
    trainer failed on it ("Could not override 'data.image_size'")."""
    for override in (
        "data.image_size=64",
        "training.lr=fast",
        "logging=../../../../tmp/x/y",
        "+training.extra=a b,c",
    ):
        response = submit(client, overrides=[override])
        assert response.status_code == 400, (override, response.get_json())
        message = response.get_json()["error"]["message"]
        assert override.split("=")[0] in message and "/tmp" not in message.replace(override, "")
    assert queue.training == []
    assert submit(client, overrides=["training=fast", "data.split_seed=7"]).status_code == 202


def test_no_override_reaches_past_the_config_folder_or_into_the_environment(
    client: FlaskClient, app, queue: FakeQueue, trainer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14: Hydra unescapes ``$\\{..\\}`` into an interpolation the old check missed (it
    read the trainer's environment into the run's config), and a group is a name, never a path
    or a deletion. The 400 names the choices and no path of the server; the trainer checks the
    stored overrides again before composing, so a row written past the API fails too."""
    monkeypatch.setenv("SECRET_FOR_TEST", "s3cr3t-value")
    refused = {
        r"+training.note=$\{oc.env:SECRET_FOR_TEST\}": "interpolations",
        "logging=../../../../tmp/x/y": "logging must be one of mlflow, tensorboard",
        "+logging/x=../../../../tmp/x/y": "no '/' or '@' in the key",
        "~logging=mlflow": "removing a key or group",
    }
    for override, reason in refused.items():
        response = submit(client, overrides=[override])
        message = assert_error(response, 400, "validation_error")
        assert reason in message, message
        assert "s3cr3t-value" not in message and "search path" not in message.lower()
        assert not re.search(r"(?<![.\w])/(?!tmp/x/y)[\w.-]+/", message), message
    assert rows(app) == [] and queue.training == []

    with app.app_context(), services().sessions() as session:
        run = db_runs.create_run(
            session,
            data_path="faces",
            overrides=[r"+training.note=$\{oc.env:SECRET_FOR_TEST\}"],
            promote="auto",
            requested_by="admin",
        )
        session.commit()
        run_id = str(run.id)
    assert trainer(run_id) == "failed"
    assert trainer.calls["configs"] == []  # never composed into a config, never trained
    error = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()["error"]
    assert "interpolations" in error and "s3cr3t-value" not in error


def test_the_mlflow_run_of_a_failed_run_is_recorded(client: FlaskClient, trainer) -> None:
    run_id = submit(client).get_json()["id"]

    def fail_after_mlflow_started(cfg, hooks):
        hooks.mlflow_run_started("mlflow-run-9")
        raise RuntimeError("CUDA out of memory")

    assert trainer(run_id, train=fail_after_mlflow_started) == "failed"
    body = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()
    assert body["mlflow_run_id"] == "mlflow-run-9"
    assert body["error"] == "RuntimeError: CUDA out of memory"


def test_progress_is_reported_through_the_api(client: FlaskClient, trainer) -> None:
    run_id = submit(client).get_json()["id"]
    seen: dict[str, Any] = {}

    def train_with_progress(cfg, hooks):
        hooks.stage("preparing data")
        hooks.report(
            {
                "stage": "training",
                "epoch": 2,
                "max_epochs": 30,
                "step": 8,
                "total_steps": 120,
                "metrics": {"val_loss": 0.9, "val_acc": 0.6},
                "eta_seconds": 56.0,
            }
        )
        seen.update(client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json())
        return FakeResult(promote=False)

    assert trainer(run_id, train=train_with_progress) == "succeeded"
    assert seen["status"] == "running"
    progress = seen["progress"]
    assert (progress["stage"], progress["epoch"], progress["max_epochs"]) == ("training", 2, 30)
    assert progress["metrics"] == {"val_loss": 0.9, "val_acc": 0.6}
    assert progress["eta_seconds"] == 56.0 and progress["updated_at"]


def test_the_result_says_which_version_became_champion(client: FlaskClient, trainer) -> None:
    run_id = submit(client, promote="force").get_json()["id"]
    assert trainer(run_id) == "succeeded"
    body = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()
    assert body["promotion_reason"] == "v5 is now champion: promote=force"


def test_a_queued_run_is_cancelled_at_once(client: FlaskClient, trainer) -> None:
    run_id = submit(client).get_json()["id"]
    response = client.delete(f"{RUNS}/{run_id}", headers=AUTH)
    assert response.status_code == 202, response.get_json()
    assert response.get_json()["status"] == "cancelled"
    assert trainer(run_id) is None, "the trainer must not start a cancelled run"
    assert trainer.calls["configs"] == []
    assert client.delete(f"{RUNS}/{run_id}", headers=AUTH).status_code == 202  # idempotent


def test_a_running_run_is_stopped_by_its_trainer(client: FlaskClient, trainer) -> None:
    run_id = submit(client).get_json()["id"]
    answers: list[dict[str, Any]] = []

    def admin_cancels_meanwhile() -> None:
        if not answers:
            answers.append(client.delete(f"{RUNS}/{run_id}", headers=AUTH).get_json())

    process = TrainingProcess(on_wait=admin_cancels_meanwhile)
    assert trainer(run_id, launch=lambda _rid: process) == "cancelled"
    assert answers[0]["status"] == "running" and answers[0]["cancel_requested"] is True
    assert process.stopped, "the run's process was not stopped"
    body = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()
    assert body["status"] == "cancelled" and body["finished_at"]
    assert client.delete(f"{RUNS}/{run_id}", headers=AUTH).status_code == 202


def test_finished_and_unknown_runs_cannot_be_cancelled(client: FlaskClient, trainer) -> None:
    run_id = submit(client).get_json()["id"]
    assert trainer(run_id) == "succeeded"
    response = client.delete(f"{RUNS}/{run_id}", headers=AUTH)
    assert response.status_code == 409 and response.get_json()["error"]["code"] == "finished"
    assert client.delete(f"{RUNS}/{uuid.uuid4()}", headers=AUTH).status_code == 404


def test_a_run_process_that_dies_fails_the_run_with_how(client: FlaskClient, trainer) -> None:
    run_id = submit(client).get_json()["id"]
    assert trainer(run_id, launch=lambda _rid: FinishedProcess(-9)) == "failed"
    error = client.get(f"{RUNS}/{run_id}", headers=AUTH).get_json()["error"]
    assert "killed by signal 9" in error


def _heartbeat(app, name: str, role: str, data_root: str | None = None) -> None:
    from face_emotions.jobs.worker_heartbeats import touch_worker

    with app.app_context(), services().sessions() as session:
        touch_worker(
            session, name, model_version=None, device=None, backend=None, role=role,
            data_root=data_root,
        )  # fmt: skip
        session.commit()


def test_readiness_and_submission_say_when_no_trainer_consumes_the_queue(
    client: FlaskClient, app, settings: Settings, registry
) -> None:
    ready = client.get("/readyz").get_json()
    assert any("no trainer" in warning for warning in ready["warnings"]), ready
    body = submit(client).get_json()
    assert "no trainer is consuming" in body["warning"]

    _heartbeat(app, "trainer@host", "training", str(settings.resolved_data_root))
    _heartbeat(app, "host:1", "inference")
    assert client.get("/readyz").get_json()["warnings"] == []
    assert "warning" not in submit(client).get_json()
    listing = client.get("/api/v1/models", headers=AUTH).get_json()
    assert [t["name"] for t in listing["trainers"]] == ["trainer@host"]
    assert [w["name"] for w in listing["workers"]] == ["host:1"]


def test_a_trainer_reading_another_data_root_is_reported(client: FlaskClient, app) -> None:
    _heartbeat(app, "trainer@elsewhere", "training", "/srv/other-data")
    body = submit(client).get_json()
    assert "another data root" in body["warning"]
